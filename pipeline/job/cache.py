"""The content-hash cache of ``diprune run`` (``OUTPUT/cache/``): what a rerun of the same job may reuse.

Every entry is named by the sha256 of what it depends on (a canonical JSON of the inputs' content hashes and the
settings), never by time or by name, so a changed model, data file or setting simply misses:

* ``export-<key>.onnx`` (+ ``.json``: the parity check): the exported model of a ``model: {export: ...}`` spec
  (key: the spec, a ``file.py``'s sha256, input shape and name, opset, exporter, batch mode, torch version);
* ``calibration-<key>.npz``: the calibration statistics (:meth:`pipeline.calibration.stats.CalibrationStats.save`; key: the
  model's sha256, the calibration data's identity (:func:`data_identity`), pooling, batch size, summaries);
* ``candidate-<key>.onnx`` / ``.plan.json`` / ``.json``: a finished candidate after recovery (key: the model,
  the calibration data, method, budget, widths, protection, recovery, seed);
* ``eval-<key>.json``: held-out metrics of a model (key: the model bytes' sha256, the reference's sha256, the
  evaluation data's identity).

Benchmarks are never cached: latency is measured again, original and candidates in the same rounds. Entries carry
the package version and a format number, so an upgrade misses instead of reusing stale work. Delete the folder (or
run with ``--no-cache``) to recompute everything.

An entry is reused only when it is whole: a candidate's record holds the sha256 of its model and plan files, checked
on every load (a model whose weights changed since, by hand or by a disk error, is recomputed, not reused), and a
JSON entry must hold the keys its reader needs (a valid JSON missing them is recomputed). Unreadable or partial
entries are logged and recomputed, never an error.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx

from graph_ops.io import atomic_write_bytes, atomic_write_files, load_model, sha256_file
from pipeline.calibration.stats import CalibrationStats
from pipeline.errors import PruneError
from pipeline.job.config import DataSpec
from pipeline.prune.orchestrate import Candidate
from pipeline.selection.plan import PruningPlan

CACHE_FORMAT = "diprune.run-cache/1"

logger = logging.getLogger(__name__)


def _version() -> str:
    try:
        return importlib.metadata.version("diprune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def content_key(entry: str, **parts: Any) -> str:
    """sha256 of a canonical JSON of the entry kind, ``parts``, the cache format and the package version."""
    doc = {"format": CACHE_FORMAT, "version": _version(), "entry": entry, "parts": parts}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _folder_digest(root: Path) -> str:
    """Digest of a folder's files: relative path, size and modification time of each (contents are not read)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def data_identity(spec: DataSpec, dataset_name: str) -> dict[str, Any]:
    """What a dataset's content depends on: its options, the opened dataset's description and the file's sha256
    (an image folder: paths, sizes and modification times)."""
    from pipeline.data.datasets import mnist_path

    source = Path(mnist_path()) if spec.source == "mnist" else Path(spec.source)
    content = _folder_digest(source) if source.is_dir() else sha256_file(source)
    return {**asdict(spec), "source": spec.source, "dataset": dataset_name, "content": content}


class RunCache:
    """The cache folder of one output directory (nothing is written when ``enabled`` is false)."""

    def __init__(self, root: str | os.PathLike[str], *, enabled: bool = True) -> None:
        """Use ``root`` (created on the first write)."""
        self.root, self.enabled = Path(root), enabled

    def path(self, kind: str, key: str, suffix: str) -> Path:
        """``<root>/<kind>-<key[:24]><suffix>``."""
        return self.root / f"{kind}-{key[:24]}{suffix}"

    def _ready(self) -> bool:
        if self.enabled:
            self.root.mkdir(parents=True, exist_ok=True)
        return self.enabled

    # ----------------------------------------------------------------------------------------------- statistics

    def load_stats(self, key: str) -> CalibrationStats | None:
        """Cached statistics, or None (also for an unreadable entry, which is then recomputed)."""
        path = self.path("calibration", key, ".npz")
        if not self.enabled or not path.is_file():
            return None
        try:
            return CalibrationStats.load(path)
        except PruneError:
            return None

    def save_stats(self, key: str, stats: CalibrationStats) -> None:
        """Store statistics (atomically)."""
        if self._ready():
            stats.save(self.path("calibration", key, ".npz"))

    # ----------------------------------------------------------------------------------------------- candidates

    def load_candidate(self, key: str) -> Candidate | None:
        """A cached candidate (model after recovery, plan, recovery record, budget, stage timings), or None."""
        model_path = self.path("candidate", key, ".onnx")
        plan_path = self.path("candidate", key, ".plan.json")
        meta = self.load_json("candidate", key, required=("method", "recovery", "budget", "model_sha256",
                                                          "plan_sha256"))
        if meta is None or not model_path.is_file() or not plan_path.is_file():
            return None
        try:
            if (sha256_file(model_path), sha256_file(plan_path)) != (meta["model_sha256"], meta["plan_sha256"]):
                logger.warning("cached candidate %s changed since it was stored (its sha256 differs); computing it "
                               "again", model_path.name)
                return None
            plan = PruningPlan.load(plan_path)
            model = load_model(model_path)
            return Candidate(str(meta["method"]), plan, model, dict(meta["recovery"]), dict(meta["budget"]),
                             dict(meta.get("timings_s") or {}))
        except (PruneError, ValueError, TypeError, OSError) as err:
            logger.warning("ignoring the unreadable cached candidate %s (%s); computing it again", model_path.name, err)
            return None

    def save_candidate(self, key: str, candidate: Candidate) -> None:
        """Store a candidate: model, plan and record together (all or nothing)."""
        if not self._ready():
            return
        model, plan = candidate.model.SerializeToString(), candidate.plan.to_json().encode()
        meta = {"method": candidate.method, "recovery": _plain(candidate.recovery),
                "budget": _plain(candidate.budget), "timings_s": dict(candidate.timings_s),
                "model_sha256": hashlib.sha256(model).hexdigest(), "plan_sha256": hashlib.sha256(plan).hexdigest()}
        atomic_write_files({self.path("candidate", key, ".onnx"): model,
                            self.path("candidate", key, ".plan.json"): plan,
                            self.path("candidate", key, ".json"): json.dumps(meta, default=str).encode()})

    # ----------------------------------------------------------------------------------------------- JSON entries

    def load_json(self, kind: str, key: str, required: Sequence[str] = ()) -> dict[str, Any] | None:
        """A cached JSON entry (evaluation metrics, export record), or None: also for an unreadable entry, one that
        is not an object, or one without every ``required`` key (each then computed again)."""
        path = self.path(kind, key, ".json")
        if not self.enabled or not path.is_file():
            return None
        try:
            doc = json.loads(path.read_bytes())
        except (ValueError, OSError) as err:
            logger.warning("ignoring the unreadable cache entry %s (%s); computing it again", path.name, err)
            return None
        missing = [k for k in required if k not in doc] if isinstance(doc, dict) else list(required) or ["{}"]
        if missing:
            logger.warning("ignoring the cache entry %s: it misses %s; computing it again", path.name,
                           ", ".join(missing))
            return None
        return doc

    def save_json(self, kind: str, key: str, value: Mapping[str, Any]) -> None:
        """Store a JSON entry (atomically)."""
        if self._ready():
            atomic_write_bytes(self.path(kind, key, ".json"), json.dumps(_plain(value), default=str).encode())


def _plain(value: Any) -> Any:
    """Mappings (also read-only proxies) and sequences as plain JSON-ready values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def model_digest(model: onnx.ModelProto) -> str:
    """sha256 of a model's serialized bytes (what its file would hash to)."""
    return hashlib.sha256(model.SerializeToString()).hexdigest()

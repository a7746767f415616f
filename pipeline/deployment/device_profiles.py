"""Latency models from the user's own board: variant models out (``diprune latency variants``), profiles in
(``diprune latency fit``), a latency model file that ``--latency-model`` plans against.

Variants (:func:`write_variants`). The canonical model and copies of it with random group widths, exactly those
:mod:`pipeline.deployment.latency_model` measures locally (the full model, ``variants`` random widths, then the held-out
uniform fractions 0.75 / 0.5 / 0.3), are written as ``variant_NNN.onnx`` into a folder with ``variants.json``
(format ``diprune.latency-variants/1``: the widths of every variant, its role ``fit`` or ``validation``, the
model's fingerprint and the settings) and two scripts, one line per variant:

* ``run_trtexec.sh``: ``trtexec --onnx=variant_NNN.onnx [--fp16 | --int8 --fp16] --shapes=... --useCudaGraph
  --useSpinWait --separateProfileRun --profilingVerbosity=detailed --noDataTransfers
  --exportProfile=profiles/variant_NNN.trt.profile.json --exportLayerInfo=profiles/variant_NNN.trt.layers.json``,
  its output saved as ``profiles/variant_NNN.trtexec.log`` (the performance summary: whole-model GPU compute time).
  ``--int8`` on these fp32 files is TensorRT's implicit INT8 without calibration: placeholder scales, right for
  timing only.
* ``run_onnxruntime.sh``: ``python3 profile_onnxruntime.py variant_NNN.onnx --provider P --batch N
  -o profiles/variant_NNN.ort.json`` (:mod:`pipeline.deployment.ort_profile_script`, copied beside: onnxruntime and numpy only).

Profiles. trtexec's ``--exportProfile`` file is a JSON list whose first element is ``{"count": N}`` (timed
iterations) followed by one ``{"name", "timeMs", "averageMs", "medianMs", "percentage"}`` per engine layer
(TensorRT's ``sampleReporting.cpp``; ``medianMs`` since TensorRT 8, else ``averageMs``). A layer's time is its median.
onnxruntime profiles are read as the local latency model reads them (:func:`pipeline.deployment.timing.kernels_from_events`).

Mapping TensorRT layers to ONNX nodes (the hard part; what is assumed):

1. With ``--exportLayerInfo`` at ``--profilingVerbosity=detailed`` (TensorRT >= 8.6), each layer's ``Metadata``
   lists the ONNX nodes it computes, ``[ONNX Layer: NAME | ...]`` entries separated by ``\\x1f``: those names are used.
2. Otherwise the layer name is parsed. TensorRT names a fused layer by joining its ONNX nodes' names with
   ``" + "`` (``/conv1/Conv + /relu/Relu``), pointwise fusions ``PWN(a, PWN(b, c))``, Myelin regions
   ``{ForeignNode[first.../last]}`` (every node from ``first`` to ``last`` in graph order), copies into another
   layout ``Reformatting CopyNode for Input Tensor 0 to LAYER`` (a separate id ``reformat:``, sized by ``LAYER``'s
   widths). Each piece is matched to the longest node or tensor name that prefixes it at a separator (TensorRT
   adds suffixes such as ``_clone_0``).
3. A layer with one Conv / Gemm / MatMul of the cost model is modelled on that node's input and output widths
   (``t = c0 + c1 u v + c2 u + c3 v``, :mod:`pipeline.deployment.latency_model`); with several, on their MACs-share-weighted
   widths; without, on the channel width of its first node's output; a layer matched to no node (Myelin-internal
   ``__myl_*`` kernels without metadata, a layer TensorRT invented) is one fixed cost. Layers are keyed by their id
   in the full model; a layer that only some variants have (another tactic, another reformat) is fitted on those.

Whole model. When the trtexec logs (or the onnxruntime ``.timing.json`` files) are there, the sum of the layers is
calibrated against the whole-model median (``gpu_compute_time`` of the performance summary), as the local latency
model is; otherwise the latency is the sum of the layer medians. The held-out variants give ``validation``: the
predicted and measured ratios to the full model and their relative errors.

The result is a :class:`pipeline.deployment.latency_model.LatencyModel` file (``diprune.latency/1``) whose key names the source
(``trtexec profiles`` / ``onnxruntime profiles``), the device (from the trtexec log's ``Selected Device`` or the
onnxruntime providers), the batch, precision and the model's fingerprint; ``--latency-model FILE`` plans against it.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graph_ops.io import atomic_write_bytes, save_model
from pipeline.deployment.latency_build import _variant_widths, model_ladders, variant_model
from pipeline.deployment.latency_fit import UNMATCHED, _calibrate, _Graph, _match, fit_kernels, sum_times
from pipeline.deployment.latency_model import LATENCY_FORMAT, LatencyModel, LatencyTarget
from pipeline.errors import UserInputError
from pipeline.model.prepare import PreparedModel, prepare

logger = logging.getLogger(__name__)

VARIANTS_FORMAT = "diprune.latency-variants/1"
MANIFEST = "variants.json"
ORT_SCRIPT = "profile_onnxruntime.py"
SOURCES = ("trtexec", "onnxruntime")
ORT_PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                 "ort-trt": "TensorrtExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
"""The onnxruntime provider ``run_onnxruntime.sh`` asks for, per ``--backend``."""


def _files(name: str) -> dict[str, str]:
    """The profile files of one variant, relative to the folder."""
    return {"trt_profile": f"profiles/{name}.trt.profile.json", "trt_layers": f"profiles/{name}.trt.layers.json",
            "trt_log": f"profiles/{name}.trtexec.log", "ort_profile": f"profiles/{name}.ort.json",
            "ort_timing": f"profiles/{name}.ort.timing.json"}


# ----------------------------------------------------------------------------------------------- variants


def write_variants(prepared: PreparedModel, out_dir: str | Path, target: LatencyTarget, *, round_to: int = 8,
                   min_channels: int = 8) -> dict[str, Any]:
    """Write the variant models, ``variants.json`` and the two board scripts (module docstring); the manifest."""
    from graph_ops.proto import fingerprint
    from pipeline.deployment.deploy import trt_shapes
    from pipeline.deployment.trtexec import trtexec_args

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out} exists and is not a folder; give a folder for the variants (-o DIR)")
    out.mkdir(parents=True, exist_ok=True)
    ladders = model_ladders(prepared.index, round_to, min_channels)
    if not ladders:
        raise UserInputError("the model has no group that can be pruned at these widths; nothing to time")
    widths = _variant_widths(ladders, target)
    full = prepared.index.full_widths()
    fit_count = 1 + target.variants
    shapes = trt_shapes(prepared.model, target.batch)
    variants, trt_lines, ort_lines = [], [], []
    provider = ORT_PROVIDERS[target.backend]
    for i, w in enumerate(widths):
        name = f"variant_{i:03d}"
        model = onnx.load_from_string(variant_model(prepared, w))
        save_model(model, out / f"{name}.onnx")
        files = _files(name)
        variants.append({"name": name, "file": f"{name}.onnx", "role": "fit" if i < fit_count else "validation",
                         "widths": {**full, **w}})
        args = trtexec_args(f"{name}.onnx", shapes=shapes, precision=target.precision,
                            timing_cache="timing.cache", profile=files["trt_profile"], layer_info=files["trt_layers"])
        trt_lines.append(f"{shlex.join(['trtexec', *args])} > {files['trt_log']} 2>&1")
        ort_lines.append(shlex.join(["python3", ORT_SCRIPT, f"{name}.onnx", "--provider", provider, "--batch",
                                     str(target.batch), "-o", files["ort_profile"]]))
    manifest = {"format": VARIANTS_FORMAT, "model": str(prepared.path), "model_sha256": prepared.sha256,
                "fingerprint": fingerprint(prepared.model), "input_shapes": {k: list(v) for k, v in
                                                                             prepared.input_shapes.items()},
                "backend": target.backend, "precision": target.precision, "batch": target.batch,
                "round_to": round_to, "min_channels": min_channels, "seed": target.seed, "full_widths": full,
                "variants": variants}
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    header = ["#!/bin/sh", "# diprune latency variants: run on the board, then copy the profiles/ folder back beside "
              "variants.json", "# and run: diprune latency fit THIS_FOLDER -o board.latency.json", "set -e",
              'cd "$(dirname "$0")"', "mkdir -p profiles"]
    for script, lines in (("run_trtexec.sh", trt_lines), ("run_onnxruntime.sh", ort_lines)):
        path = out / script
        atomic_write_bytes(path, ("\n".join([*header, *lines]) + "\n").encode())
        path.chmod(0o755)
    shutil.copyfile(Path(__file__).with_name("ort_profile_script.py"), out / ORT_SCRIPT)
    return manifest


# ----------------------------------------------------------------------------------------------- reading profiles


def _json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); is it a complete {what}?"
                             ) from None


def read_trt_profile(path: str | Path) -> list[tuple[str, float]]:
    """``(layer name, median microseconds)`` of a trtexec ``--exportProfile`` file (module docstring)."""
    doc = _json(Path(path), "trtexec --exportProfile file")
    if not isinstance(doc, list):
        raise UserInputError(f"{path}: a trtexec profile is a JSON list ([{{\"count\": N}}, {{\"name\": ...}}, ...])")
    out = []
    for entry in doc:
        if not isinstance(entry, dict) or "name" not in entry:
            continue  # the leading {"count": N}
        ms = entry.get("medianMs", entry.get("averageMs"))
        if ms is None and entry.get("timeMs") is not None and isinstance(doc[0], dict) and doc[0].get("count"):
            ms = entry["timeMs"] / doc[0]["count"]
        if ms is None:
            raise UserInputError(f"{path}: layer {entry['name']!r} has no medianMs, averageMs or timeMs")
        out.append((str(entry["name"]), float(ms) * 1e3))
    if not out:
        raise UserInputError(f"{path}: the trtexec profile lists no layer")
    return out


_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^|\]]+?)\s*(?:\||\])")


def read_trt_layer_info(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Layer name -> the ONNX node names of its ``Metadata`` (``--exportLayerInfo``); layers without metadata are
    left out (their names are parsed instead)."""
    doc = _json(Path(path), "trtexec --exportLayerInfo file")
    layers = doc.get("Layers", []) if isinstance(doc, dict) else []
    out = {}
    for layer in layers:
        if isinstance(layer, dict) and layer.get("Name") and layer.get("Metadata"):
            names = tuple(m.strip() for m in _ONNX_LAYER.findall(str(layer["Metadata"])))
            if names:
                out[str(layer["Name"])] = names
    return out


_REFORMAT = re.compile(r"^Reformatting CopyNode for (?:Input|Output) Tensor \d+ to (.+)$")
_FOREIGN = re.compile(r"^\{ForeignNode\[(.+?)\.\.\.(.+)\]\}$")
_PIECES = re.compile(r" \+ |PWN\(|\)|, ")


@dataclass(frozen=True)
class _Names:
    """The canonical model's node names, for mapping TensorRT layer names back (module docstring)."""

    graph: _Graph
    order: Mapping[str, int]

    @classmethod
    def of(cls, graph: _Graph) -> _Names:
        return cls(graph, {n.name: i for i, n in enumerate(graph.model.graph.node) if n.name})

    def node(self, piece: str) -> str | None:
        """The node a name piece refers to: the longest node or tensor name prefixing it at a separator."""
        matched = _match(piece.strip(), self.graph.names)
        if matched is None:
            return None
        return self.graph.model.graph.node[self.graph.names[matched]].name or None

    def layer(self, name: str, info: Mapping[str, tuple[str, ...]]) -> tuple[tuple[str, ...], str]:
        """(ONNX node names, id prefix) of one TensorRT layer."""
        prefix = ""
        reformat = _REFORMAT.match(name)
        if reformat:
            name, prefix = reformat.group(1), "reformat:"
        if name in info:
            return info[name], prefix
        foreign = _FOREIGN.match(name)
        if foreign:
            first, last = (self.node(p) for p in foreign.groups())
            if first in self.order and last in self.order:
                nodes = self.graph.model.graph.node[self.order[first]:self.order[last] + 1]
                return tuple(n.name for n in nodes), prefix
        pieces = [self.node(p) for p in _PIECES.split(name) if p.strip()]
        return tuple(p for p in pieces if p), prefix


def trt_times(graph: _Graph, profile: Path, layers: Path | None) -> dict[str, tuple[float, tuple[str, ...], Any]]:
    """One variant's trtexec profile as microseconds per id (:func:`pipeline.deployment.latency_fit.sum_times`)."""
    info = read_trt_layer_info(layers) if layers is not None and layers.is_file() else {}
    names = _Names.of(graph)
    items = []
    for layer, us in read_trt_profile(profile):
        nodes, prefix = names.layer(layer, info)
        items.append((graph.identify_nodes(nodes, prefix), "trt", us))
    return sum_times(items)


def _trt_whole_us(log: Path) -> tuple[float | None, dict[str, Any]]:
    """The whole-model median GPU compute microseconds of a trtexec log, and what the log says of the device."""
    from pipeline.deployment.trtexec import parse_summary

    if not log.is_file():
        return None, {}
    text = log.read_text(errors="replace")
    try:
        summary = parse_summary(text)
    except UserInputError:
        return None, {}
    device = re.search(r"Selected Device:\s*(.+)", text)
    meta = {"device": device.group(1).strip() if device else None, "tensorrt": summary.get("tensorrt_version")}
    compute = summary.get("gpu_compute_time") or summary.get("latency") or {}
    median = compute.get("median", compute.get("mean"))
    return (None if median is None else median * 1e3), meta


def ort_times(graph: _Graph, profile: Path) -> tuple[dict[str, tuple[float, tuple[str, ...], Any]], float | None,
                                                     dict[str, Any]]:
    """One variant's onnxruntime profile as microseconds per id, the whole-model median (from the ``.timing.json``
    beside it) and what it says of the runtime."""
    from pipeline.deployment.timing import kernels_from_events

    timing_path = profile.with_name(profile.name[:-len(".json")] + ".timing.json")
    timing = _json(timing_path, "timing file") if timing_path.is_file() else {}
    events = _json(profile, "onnxruntime profile")
    kernels = kernels_from_events(events, warmup=int(timing.get("warmup", 0)),
                                  providers=tuple(timing.get("providers", ())))
    whole = timing.get("median_ms")
    meta = {"device": ",".join(timing.get("providers", ())) or None, "onnxruntime": timing.get("onnxruntime")}
    return graph.kernel_times(kernels), None if whole is None else float(whole) * 1e3, meta


# ----------------------------------------------------------------------------------------------- fitting


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The ``variants.json`` of a variants folder."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserInputError(f"{path} not found: give the folder 'diprune latency variants' wrote")
    doc = _json(path, "variants.json")
    if not isinstance(doc, dict) or doc.get("format") != VARIANTS_FORMAT:
        raise UserInputError(f"{path} is not a variants manifest (format {VARIANTS_FORMAT} expected)")
    return doc


def _source(folder: Path, variants: Sequence[Mapping[str, Any]], source: str | None) -> str:
    """The profile kind to read: ``source``, else the one present for the full model (refusing both or none)."""
    first = _files(variants[0]["name"])
    present = [s for s, key in (("trtexec", "trt_profile"), ("onnxruntime", "ort_profile"))
               if (folder / first[key]).is_file()]
    if source is not None:
        if source not in SOURCES:
            raise UserInputError(f"unknown profile source {source!r}; choose one of {', '.join(SOURCES)}")
        if source not in present:
            key = "trt_profile" if source == "trtexec" else "ort_profile"
            raise UserInputError(f"{folder / first[key]} not found: run the {source} script on the board and copy "
                                 "its profiles/ folder here")
        return source
    if not present:
        raise UserInputError(f"no profile of the full model in {folder / 'profiles'}: run run_trtexec.sh or "
                             "run_onnxruntime.sh on the board and copy the profiles/ folder back beside variants.json")
    if len(present) > 1:
        raise UserInputError("both trtexec and onnxruntime profiles are present: choose one with --source")
    return present[0]


def fit_board_profiles(folder: str | Path, *, source: str | None = None, block: int = 1) -> LatencyModel:
    """A latency model fitted on the board's profiles of a variants folder (module docstring).

    Raises:
        UserInputError: no manifest, missing or unreadable profiles of the full model, too few fitted variants, a
            folder whose models do not match its manifest.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    variants = manifest["variants"]
    source = _source(folder, variants, source)
    prepared = prepare(folder / variants[0]["file"])
    full = prepared.index.full_widths()
    if full != {g: int(w) for g, w in manifest["full_widths"].items()}:
        raise UserInputError(f"{folder / variants[0]['file']} does not match {MANIFEST} (other groups or widths); "
                             "write the variants again")
    graph = _Graph.of(prepared)
    observations, meta = [], {}
    for variant in variants:
        files = _files(variant["name"])
        key = "trt_profile" if source == "trtexec" else "ort_profile"
        if not (folder / files[key]).is_file():
            logger.warning("latency fit: no %s profile for %s; left out", source, variant["name"])
            continue
        if source == "trtexec":
            times = trt_times(graph, folder / files["trt_profile"], folder / files["trt_layers"])
            whole, info = _trt_whole_us(folder / files["trt_log"])
        else:
            times, whole, info = ort_times(graph, folder / files["ort_profile"])
        meta = meta or info
        observations.append((variant, {g: int(w) for g, w in variant["widths"].items()}, times, whole))
    fitted = [o for o in observations if o[0]["role"] == "fit"]
    if len(fitted) < 5:
        raise UserInputError(f"only {len(fitted)} fitted variants have profiles; the fit needs at least 5 (the full "
                             "model and 4 others)")
    kernels = tuple(fit_kernels([o[2] for o in fitted], [o[1] for o in fitted], full, block))
    provisional = LatencyModel({}, full, kernels, 1.0, 0.0)
    sums = np.array([provisional.kernel_us(o[1]) for o in fitted])
    wholes = [o[3] for o in fitted]
    calibrated = all(w is not None for w in wholes)
    scale, offset, exponent = _calibrate(sums, np.array(wholes)) if calibrated else (1.0, 0.0, 1.0)
    key = {"backend": "tensorrt" if source == "trtexec" else manifest["backend"], "source": f"{source} profiles",
           "device": meta.get("device") or "unknown (board)", "versions": {k: v for k, v in meta.items()
                                                                          if k != "device" and v is not None},
           "threads": None, "batch": manifest["batch"], "precision": manifest["precision"],
           "round_to": manifest["round_to"], "min_channels": manifest["min_channels"], "variants": len(fitted) - 1,
           "block": block, "fingerprint": manifest["fingerprint"], "input_shapes": manifest.get("input_shapes", {}),
           "whole_model": "calibrated" if calibrated
           else "sum of layer medians"}
    model = LatencyModel(key, full, kernels, scale, offset, exponent)

    def measured(obs: tuple[Any, ...]) -> float:
        return obs[3] if calibrated and obs[3] is not None else float(sum(t[0] for t in obs[2].values()))

    base = measured(observations[0])
    samples = tuple({"variant": o[0]["name"], "kernel_us": round(float(s), 3),
                     "measured_ratio": round(measured(o) / base, 4), "predicted_ratio": round(model.ratio(o[1]), 4)}
                    for o, s in zip(fitted, sums, strict=True))
    held = [o for o in observations if o[0]["role"] == "validation"]
    predicted = [model.ratio(o[1]) for o in held]
    ratios = [measured(o) / base for o in held]
    validation = {"variants": [o[0]["name"] for o in held], "predicted_ratio": [round(p, 4) for p in predicted],
                  "measured_ratio": [round(m, 4) for m in ratios],
                  "errors": [round(p / m - 1, 4) for p, m in zip(predicted, ratios, strict=True)]}
    unmatched = sum(1 for k in kernels if k.id == UNMATCHED)
    logger.info("latency fit: %d layer ids (%d unmatched) over %d variants", len(kernels), unmatched, len(fitted))
    return LatencyModel(key, full, kernels, scale, offset, exponent, samples, validation)


def load_latency_model(path: str | Path, prepared: PreparedModel) -> LatencyModel:
    """A latency model file for planning this model: its format, and that it was made for this graph.

    Raises:
        UserInputError: not a latency model file, or one made for another model (fingerprint or group widths).
    """
    from graph_ops.proto import fingerprint

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"latency model file not found: {path} (make one with 'diprune latency fit DIR')")
    try:
        model = LatencyModel.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as err:
        raise UserInputError(f"{path} is not a readable latency model ({LATENCY_FORMAT}): {err}") from None
    wanted = model.key.get("fingerprint")
    if wanted is not None and wanted != fingerprint(prepared.model):
        raise UserInputError(f"{path} was fitted on another model (fingerprint differs from {prepared.path}); make "
                             "variants of this model (with the same --input-shape) and fit them")
    sizes = {k: list(v) for k, v in prepared.input_shapes.items()}
    if model.key.get("input_shapes") is not None and model.key["input_shapes"] != sizes:
        fitted_at, run_at = model.key["input_shapes"] or "as declared", sizes or "as declared"
        raise UserInputError(f"{path} was fitted on another model (input sizes {fitted_at}, this run {run_at}); "
                             "make variants with the same --input-shape and fit them")
    if dict(model.full_widths) != prepared.index.full_widths():
        raise UserInputError(f"{path} was fitted on another model (its group widths differ from {prepared.path})")
    return model

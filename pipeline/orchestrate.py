"""The one-shot job: canonicalize, analyse, calibrate, score, plan, rewrite, verify, evaluate, report.

Every stage is a public function of its own module; this module only chains them, times them and writes the
outputs atomically. The input model file is never modified; the output is written only after the pruned graph passed
``onnx.checker`` (full check) and, when an evaluation set is given, after both models were evaluated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from graph_ops.canonicalize import canonicalize
from graph_ops.channels import analyze, producer_weights
from graph_ops.cost import count
from graph_ops.errors import UserInputError
from graph_ops.groups import ChannelGroupIndex
from graph_ops.io import check_writable, load_model, save_model, sha256_file
from graph_ops.prune import apply_plan
from pipeline.plan import PruningPlan, select_channels
from pipeline.report import Report
from pipeline.scorers import SCORERS
from pipeline.scorers.base import ChannelScores, ScoringContext
from pipeline.stats import CalibrationStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedModel:
    """A model loaded once: its file identity, its canonical graph and its channel groups."""

    path: Path
    sha256: str
    model: onnx.ModelProto
    index: ChannelGroupIndex

    def weights(self) -> dict[str, np.ndarray]:
        """Initializers as numpy arrays (for the data-free scorers)."""
        return {init.name: numpy_helper.to_array(init) for init in self.model.graph.initializer}


def prepare(path: str | Path) -> PreparedModel:
    """Load, canonicalize and analyse a model file."""
    path = Path(path)
    model = load_model(path)
    sha = sha256_file(path)
    canonical = canonicalize(model)
    return PreparedModel(path=path, sha256=sha, model=canonical, index=analyze(canonical))


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - start
    logger.info("%s took %.2f s", stage, timings[stage])


def score(prepared: PreparedModel, stats: CalibrationStats | None, method: str, *, seed: int = 0,
          params: Mapping[str, float] | None = None) -> ChannelScores:
    """Score every prunable group of a prepared model with a registered scorer."""
    scorer = SCORERS[method]
    ctx = ScoringContext(index=prepared.index, stats=stats, weights=prepared.weights(), params=dict(params or {}),
                         seed=seed, model_sha256=prepared.sha256, producer_weights=producer_weights(prepared.model))
    return scorer(ctx)


def keep_lists(plan: PruningPlan) -> dict[str, tuple[int, ...]]:
    """The plan's keep lists, the form ``apply_plan`` takes."""
    return {gid: tuple(keep) for gid, keep in plan.keep.items()}


def prune(model_path: str | Path, out_path: str | Path, *, data: object | None, method: str = "di",
          target_macs: float | None = None, target_params: float | None = None, round_to: int = 8,
          min_channels: int = 8, protect: Iterable[str] = (), pooling: str = "gap", batch_size: int = 64,
          eval_data: object | None = None, seed: int = 0, progress: bool = True, recover: str | None = None,
          recover_mode: str = "sequential") -> Report:
    """Prune a model file to a budget; write ``out_path``, ``<out>.plan.json`` and ``<out>.report.json``.

    ``data`` and ``eval_data`` are :class:`pipeline.data.Dataset` objects (calibration from the training split only,
    evaluation from held-out data). Data-free methods (``l1``, ``l2``, ``random``) accept ``data=None`` when
    ``recover="none"``. ``recover`` (a key of ``pipeline.recover.RECOVERY``; default
    ``pipeline.recover.DEFAULT_RECOVERY``) refits the layers affected by the removed channels by least squares on the
    calibration data; ``recover_mode`` is ``sequential`` (layer by layer, inputs from the partly recovered model) or
    ``one-pass``.
    """
    from pipeline.calibrate import calibrate, default_probes
    from pipeline.recover import DEFAULT_RECOVERY, RECOVERY
    from pipeline.recover import recover as recover_model

    recover = DEFAULT_RECOVERY if recover is None else recover
    out_path = check_writable(out_path, model_path)
    if recover not in RECOVERY:
        raise UserInputError(f"unknown recovery {recover!r}; choose one of {sorted(RECOVERY)}")
    if recover_mode not in ("sequential", "one-pass"):
        raise UserInputError(f"unknown recovery mode {recover_mode!r}; choose 'sequential' or 'one-pass'")
    if data is None and (recover != "none" or getattr(SCORERS[method], "requires_stats", False)):
        raise UserInputError(f"method {method!r} with recovery {recover!r} needs calibration data: pass --data "
                             "(or use a data-free method with --recover none)")
    timings: dict[str, float] = {}
    with _timed(timings, "analyze"):
        prepared = prepare(model_path)
    stats = None
    if getattr(SCORERS[method], "requires_stats", False):
        with _timed(timings, "calibrate"):
            stats = calibrate(prepared.path, data, probes=default_probes(prepared.model, prepared.index), pooling=pooling, batch_size=batch_size,
                              progress=progress, canonical=prepared.model)
    with _timed(timings, "score"):
        scores = score(prepared, stats, method, seed=seed)
    with _timed(timings, "plan"):
        plan = select_channels(scores, prepared.index, target_macs=target_macs, target_params=target_params,
                               round_to=round_to, min_channels=min_channels, protect=tuple(protect))
    with _timed(timings, "apply"):
        pruned = apply_plan(prepared.model, prepared.index, keep_lists(plan))
    recovery: dict[str, object] = {"method": "none"}
    if recover != "none":
        with _timed(timings, "recover"):
            pruned, rec = recover_model(prepared.model, pruned, prepared.index, keep_lists(plan), data,
                                        method=recover, batch_size=batch_size, seed=seed, progress=progress,
                                        sequential=recover_mode == "sequential")
        recovery = {**rec.to_dict(), "mode": recover_mode}
    evaluation = {}
    if eval_data is not None:
        from pipeline.evaluate import evaluate

        with _timed(timings, "evaluate"):
            evaluation = {"original": evaluate(prepared.model, eval_data).to_dict(),
                          "pruned": evaluate(pruned, eval_data, reference=prepared.model).to_dict()}
    save_model(pruned, out_path)
    plan.save(Path(f"{out_path}.plan.json"))
    before, after = count(prepared.model), count(pruned)
    groups = {g.id: {"size": g.size, "kept": len(plan.keep.get(g.id, range(g.size)))} for g in prepared.index.groups}
    notes = tuple(str(n) for n in plan.meta.get("notes", ()))
    report = Report(
        model=str(model_path), model_sha256=prepared.sha256, output=str(out_path), output_sha256=sha256_file(out_path),
        method=method, budget={"target_macs": target_macs, "target_params": target_params, "round_to": round_to,
                               "min_channels": min_channels, "protect": sorted(protect)},
        original={"macs": before.macs, "params": before.params}, pruned={"macs": after.macs, "params": after.params},
        groups=groups, timings_s=timings, evaluation=evaluation, notes=notes, recovery=recovery)
    report.save(Path(f"{out_path}.report.json"))
    return report

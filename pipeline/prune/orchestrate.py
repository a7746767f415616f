"""The stage chain: prepare -> calibrate -> score -> plan -> apply -> recover -> evaluate -> report, each run once.

:class:`PruneRun` holds one prepared model (:mod:`pipeline.model.prepare`: loaded, canonicalized and analysed once) and its
calibration data, and runs every stage on demand, once per need: statistics are computed once per pooling and shared
by every statistics-based method, scores once per method and seed, and every stage takes the one analysis instead of
analysing again. :meth:`PruneRun.candidate` chains plan -> apply -> recover for one method and budget. ``prune``
(the one-shot job of the CLI), the demo and the benchmarks all go through it. The input model file is never
modified; :func:`pipeline.prune.one_shot.write_candidate` writes a candidate's model, plan and report atomically, the model only after it
passed ``onnx.checker`` (full check) and, when an evaluation set is given, after both models were evaluated.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from graph_ops.cost import CostReport
from graph_ops.errors import UserInputError
from graph_ops.io import (
    verify_model,
)
from graph_ops.prune import apply_plan
from graph_ops.task_head import model_task
from pipeline.calibration.calibrate import DEFAULT_POOLING, MIN_SAMPLES_PER_DIM, calibrate
from pipeline.calibration.stats import CalibrationStats
from pipeline.data.datasets import check_against_model
from pipeline.data.shards import SHARD_BATCHES
from pipeline.data.targets import LabelOptions
from pipeline.data.task import Task
from pipeline.errors import CalibrationError
from pipeline.evaluation.evaluate import is_classifier
from pipeline.memory import release_memory
from pipeline.model.prepare import PreparedModel, as_prepared, prepare
from pipeline.recovery import DEFAULT_RECOVERY, RECOVERY, recover
from pipeline.selection.allocate import movable_groups, select_channels
from pipeline.selection.plan import PruningPlan
from pipeline.selection.scorers import SCORERS
from pipeline.selection.scorers.base import ChannelScores, ScoringContext
from pipeline.selection.sensitivity import MIN_SAMPLES, STRETCH, Sensitivity, fit_budget, measure
from pipeline.selection.widths import anchor_widths, block_order

if TYPE_CHECKING:
    from pipeline.deployment.latency_plan import LatencyBudget

__all__ = ["Candidate", "PreparedModel", "PruneRun", "keep_lists", "prepare", "require_channels", "score"]

logger = logging.getLogger(__name__)

RECOVER_MODES = ("sequential", "one-pass")
ALLOCATIONS = ("measured", "rule")
"""How the planner ranks groups: ``measured`` (default) by the damage each group's next channels cause on a small
calibration subset (:mod:`pipeline.selection.sensitivity`; ends measured like every group), ``rule`` by the criterion's own
numbers with the first layer and the classifier input protected (the rule before issue 31; ``--prune-ends`` lifts
the protection)."""
DEFAULT_ALLOCATION = "measured"


def score(prepared: PreparedModel, stats: CalibrationStats | None, method: str, *, seed: int = 0,
          params: Mapping[str, float] | None = None) -> ChannelScores:
    """Score every prunable group of a prepared model with a registered scorer (the scores record its task)."""
    if method not in SCORERS:
        raise UserInputError(f"unknown method {method!r}; choose one of {', '.join(sorted(SCORERS))}")
    task = prepared.task.to_dict() if prepared.task else None
    if stats is not None and (stats.task or None) != task:
        raise UserInputError(f"the statistics were calibrated for task {stats.task}, the model is prepared for "
                             f"{task}; calibrate with the same --task-classes / --task-map")
    if needs_labels(method) and stats is not None and stats.probes:
        counts = next(iter(stats.probes.values())).class_counts
        if int(np.count_nonzero(counts)) < 2:
            raise CalibrationError(f"method '{method}' needs class labels, but the statistics hold one class (they "
                                   f"were calibrated on unlabelled data); calibrate with --labels model (the model's "
                                   f"own decisions) or on labelled data, or use a label-free method (l1, l2, random, "
                                   f"mean-act, apoz)")
    ctx = ScoringContext(index=prepared.index, stats=stats, weights=prepared.weights(), params=dict(params or {}),
                         seed=seed, model_sha256=prepared.sha256, producer_weights=prepared.producer_weights,
                         layers=prepared.layers)
    scores = SCORERS[method](ctx)
    if task:
        scores = replace(scores, task=task)
    if needs_labels(method) and stats is not None and stats.targets:
        scores = replace(scores, labels={k: v for k, v in stats.targets.items() if k != "views"})
    return scores


def require_channels(prepared: PreparedModel) -> None:
    """Refuse a model with no channel to prune (no Conv, ConvTranspose, Gemm or MatMul with constant weights, or no
    parameters at all), before any work."""
    if not any(g.producers for g in prepared.index.groups) or not prepared.cost.params:
        raise UserInputError(f"{prepared.path} has no Conv, ConvTranspose, Gemm or MatMul with constant weights: "
                             "there are no channels to prune ('diprune inspect' lists its groups)")


def keep_lists(plan: PruningPlan) -> dict[str, tuple[int, ...]]:
    """The plan's keep lists, the form ``apply_plan`` takes."""
    return {gid: tuple(keep) for gid, keep in plan.keep.items()}


def needs_stats(method: str) -> bool:
    """True for the scorers that read calibration statistics."""
    return bool(getattr(SCORERS[method], "requires_stats", False))


def needs_labels(method: str) -> bool:
    """True for the label-aware scorers (``di``, ``lda``, ``pls-vip``)."""
    return bool(getattr(SCORERS[method], "requires_labels", False))


def needs_summaries(method: str) -> bool:
    """True for the scorers that read zero counts / absolute sums (``mean-act``, ``apoz``)."""
    return bool(getattr(SCORERS[method], "requires_summaries", False))


@dataclass(frozen=True)
class Candidate:
    """One pruned model of a run: the method and plan, the model after recovery, and what recovery did."""

    method: str
    plan: PruningPlan
    model: onnx.ModelProto
    recovery: Mapping[str, Any]
    budget: Mapping[str, Any]
    timings_s: Mapping[str, float] = field(default_factory=dict)


def _work_folder(path: str | os.PathLike[str]) -> str:
    """``path`` as a string when it is a writable folder (recovery spills there); else a UserInputError that says so."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserInputError(f"work folder {folder} does not exist or is not a folder; create it or pass another "
                             "work_dir (recovery keeps its spilled activations there)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserInputError(f"work folder {folder} is not writable; pass a writable work_dir")
    return str(folder)


class PruneRun:
    """One model and its calibration data; every stage on demand, once per need (see the module docstring).

    Args:
        model: a prepared model or an ONNX file (prepared here).
        data: calibration data (a :class:`pipeline.data.datasets.Dataset`, training split), or None for data-free methods
            without recovery.
        pooling: calibration pooling (``gap``, ``avg2``, ``avg4``).
        batch_size: samples per onnxruntime call (calibration and recovery).
        backend: ``auto``, ``ort-cpu`` or ``ort-cuda`` for calibration, recovery and evaluation.
        intra_op_threads: onnxruntime intra-op threads.
        seed: seed of random scorers and of recovery's position sampling.
        progress: tqdm bars on stderr.
        work_dir: where recovery may spill large activations (default: the system's temp folder).
        task: the user's task (:class:`pipeline.data.task.Task`): the model's head is rewritten into the task's scores
            and the calibration data keeps only the task's samples, with task labels.
        cluster: :class:`pipeline.cluster.RayOptions` (``pipeline.cluster.ray_options(workers=N)`` or
            ``(address=...)``): calibration and recovery shards on Ray workers, same results; None: this process.
        shard_batches: batches per shard (:mod:`pipeline.data.shards`; results depend on it in the last bits only).
        labels: where the labels of the label-aware methods come from (:class:`pipeline.data.targets.LabelOptions`;
            default: the data's, else the model's own decisions).
    """

    def __init__(self, model: PreparedModel | str | os.PathLike[str], data: Any | None, *,
                 pooling: str = DEFAULT_POOLING,
                 batch_size: int = 64, backend: str = "auto", intra_op_threads: int | None = None, seed: int = 0,
                 progress: bool = True, work_dir: str | os.PathLike[str] | None = None,
                 task: Task | None = None, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 cluster: Any | None = None, shard_batches: int = SHARD_BATCHES,
                 labels: LabelOptions | None = None) -> None:
        """Prepare the model (timed as ``analyze``; ``input_shapes`` fix dynamic input dims); nothing else runs yet.

        Raises:
            UserInputError: the model has no channel to prune (:func:`require_channels`), or a bad file.
        """
        self.timings: dict[str, float] = {}
        with self.timed("analyze"):
            self.prepared = as_prepared(model, input_shapes, task=task)
        require_channels(self.prepared)
        self.task = self.prepared.task
        self.dropped: dict[str, int] = {}
        data = self.check_data(self.task_data(data, "calibration"), "calibration")
        self.data, self.pooling, self.batch_size = data, pooling, batch_size
        self.backend, self.threads, self.seed, self.progress = backend, intra_op_threads, seed, progress
        self.work_dir = None if work_dir is None else _work_folder(work_dir)
        self.cluster, self.shard_batches = cluster, shard_batches
        self.labels = labels or LabelOptions()
        self._stats: dict[tuple[bool, bool], CalibrationStats] = {}  # (summaries, labelled) -> statistics
        self._scores: dict[tuple[str, int, tuple[tuple[str, float], ...]], ChannelScores] = {}
        self._sensitivity: dict[tuple[Any, ...], tuple[ChannelScores, Sensitivity]] = {}

    def check_data(self, data: Any | None, role: str, *, labels: bool = False) -> Any | None:
        """``data`` as it is, once its first batch fits this model (names, rank, static dims, dtype, finite values;
        no data without samples) and, with ``labels``, its labels are class ids of the model's output (evaluation):
        a dataset that cannot feed the model is refused before any work, not after the candidates were made."""
        if data is None or not hasattr(data, "take"):
            return data
        from pipeline.data.datasets import validate_batch
        from pipeline.evaluation.evaluate import check_classifier_labels
        from pipeline.model.runtime import model_input_specs

        check_classifier_labels(self.prepared.model, data, role)

        specs = model_input_specs(self.prepared.model)
        if data.num_samples == 0:
            raise CalibrationError(f"{role} data '{data.name}' has no samples")
        static = {shape[0] for shape, _ in specs.values() if shape and shape[0] is not None}
        first = min(data.num_samples, *static) if static else min(data.num_samples, 64)  # a static batch: its size
        feeds, _ = data.bind(list(specs)).take(0, first)
        validate_batch(feeds, specs, f"{role} data '{data.name}'")
        dims = self.prepared.model.graph.output[0].type.tensor_type.shape.dim
        width = dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") else 0
        found = getattr(data, "labels", None)
        if labels and found is not None and width and found.size and int(found.max()) >= width:
            raise CalibrationError(f"{role} data '{data.name}' has label {int(found.max())}, but the model has "
                                   f"{width} classes (labels 0..{width - 1}); is this the right dataset for this "
                                   "model?")
        return data

    def task_data(self, data: Any | None, role: str) -> Any | None:
        """``data`` restricted to the run's task (samples of other classes dropped, task labels), or as it is."""
        if data is None or self.task is None:
            return data
        restricted = self.task.dataset(data)
        self.dropped[role] = restricted.dropped
        return restricted.data

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[stage]``; what the stage freed goes back to the system."""
        start = time.perf_counter()
        yield
        release_memory()
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
        logger.info("%s took %.2f s", stage, time.perf_counter() - start)

    def stats(self, *, summaries: bool = False, labels: bool = False) -> CalibrationStats:
        """Calibration statistics (computed once per need; with ``summaries`` the zero counts and absolute sums
        too; with ``labels`` the samples carry classes: the data's, or the model's own decisions when the data has
        none or ``--labels model`` says so; the data's labels are recorded whenever it has some)."""
        for (with_summaries, labelled), stats in self._stats.items():
            if (with_summaries or not summaries) and (labelled or not labels):
                return stats
        if self.data is None:
            raise UserInputError("calibration needs data: pass --data (or use a data-free method: l1, l2, random)")
        options = self.labels if labels else replace(self.labels, source=None)  # label-free: the data's, if any
        with self.timed("calibrate"):
            stats = calibrate(self.prepared, self.data, pooling=self.pooling, batch_size=self.batch_size,
                              backend=self.backend, intra_op_threads=self.threads, progress=self.progress,
                              summaries=summaries, require_labels=labels, cluster=self.cluster,
                              shard_batches=self.shard_batches, labels=options, seed=self.seed)
        self._stats[(summaries, stats.targets is not None)] = stats
        return stats

    def use_stats(self, stats: CalibrationStats, *, summaries: bool) -> None:
        """Use statistics computed earlier for this model and pooling (e.g. from a cache) instead of calibrating.

        Raises:
            CalibrationError: the statistics belong to another model or pooling.
        """
        if stats.model_sha256 != self.prepared.sha256 or stats.pooling != self.pooling:
            raise CalibrationError(f"statistics of model {stats.model_sha256[:12]} / pooling {stats.pooling} do not "
                                   f"fit this run ({self.prepared.sha256[:12]} / {self.pooling})")
        self._stats[(summaries, stats.targets is not None)] = stats

    def scores(self, method: str, *, seed: int | None = None,
               params: Mapping[str, float] | None = None) -> ChannelScores:
        """Scores of one method (statistics only for the methods that read them), computed once per setting."""
        if method not in SCORERS:
            raise UserInputError(f"unknown method {method!r}; choose one of {', '.join(sorted(SCORERS))}")
        key = (method, self.seed if seed is None else seed, tuple(sorted((params or {}).items())))
        if key not in self._scores:
            stats = self.stats(summaries=needs_summaries(method), labels=needs_labels(method)) \
                if needs_stats(method) else None
            with self.timed("score"):
                self._scores[key] = score(self.prepared, stats, method, seed=key[1], params=params)
        return self._scores[key]

    def calibration_record(self) -> dict[str, Any]:
        """How many calibration samples each probe had against the advice (10 per feature) and what they were
        paired with (``targets``: :meth:`pipeline.data.targets.Targets.to_dict`), when calibrated."""
        ranked = sorted(self._stats.items(), key=lambda item: (not item[0][1], not item[0][0]))
        stats = ranked[0][1] if ranked else None
        if stats is None:
            return {}
        probes = {name: {"samples": p.n, "features": p.dim, "advised_samples": MIN_SAMPLES_PER_DIM * p.dim}
                  for name, p in stats.probes.items()}
        below = sorted(name for name, p in probes.items() if p["samples"] < p["advised_samples"])
        record = {"pooling": stats.pooling, "samples": next(iter(probes.values()))["samples"] if probes else 0,
                  "advised_samples": max((p["advised_samples"] for p in probes.values()), default=0),
                  "probes_below_advice": below, "probes": probes}
        if stats.targets:
            record["targets"] = dict(stats.targets)
        return record

    def task_record(self) -> dict[str, Any]:
        """What reports say about the task: the head (output, width, classes or groups) and dropped samples."""
        if self.task is None:
            return {}
        head = model_task(self.prepared.model) or {}
        return {**self.task.to_dict(), "output": head.get("output"), "original_width": head.get("width"),
                "names": list(self.task.names), "dropped_samples": dict(self.dropped)}

    def sensitivity(self, scores: ChannelScores, *, round_to: int = 8, min_channels: int = 8,
                    protect: Iterable[str] = ()) -> Sensitivity | None:
        """The measured damage of every movable group at its anchor widths, removing channels in ``scores``' order
        (:mod:`pipeline.selection.sensitivity`, on the first samples of the calibration data; once per setting); None when
        the measurement does not fit its cost cap (:func:`pipeline.selection.sensitivity.fit_budget`)."""
        key = (id(scores), round_to, min_channels, tuple(sorted(protect)))
        if key not in self._sensitivity:
            _, movable = movable_groups(scores, self.prepared.index, round_to, min_channels, protect, False)
            anchors = {g.id: anchor_widths(g.size, round_to, min_channels, g.blocks) for g in movable}
            fitted = fit_budget(anchors, int(getattr(self.data, "num_samples", 0) or 0))
            measured = None
            if fitted is not None:
                orders = {g.id: block_order(scores.elimination_order(g.id), g.blocks) for g in movable}
                with self.timed("sensitivity"):
                    measured = measure(self.prepared.model, self.prepared.index, scores, movable, fitted[0],
                                       self.data, orders=orders, samples=fitted[1], backend=self.backend,
                                       intra_op_threads=self.threads)
            self._sensitivity[key] = (scores, measured)
        return self._sensitivity[key][1]

    def plan(self, scores: ChannelScores, *, target_macs: float | None = None, target_params: float | None = None,
             round_to: int = 8, min_channels: int = 8, protect: Iterable[str] = (),
             keep_first_and_last: bool = True, latency: LatencyBudget | None = None,
             allocation: str = DEFAULT_ALLOCATION, **planner: Any) -> PruningPlan:
        """The planner's allocation for a budget, for this model (its sha recorded); ``planner``: further options of
        :func:`pipeline.selection.allocate.select_channels` (``fill_back``, ``fine_share``); with a ``latency`` budget the latency
        planner and its closed loop on the target (:mod:`pipeline.deployment.latency_plan`). ``allocation`` (:data:`ALLOCATIONS`):
        ``measured`` ranks groups by their measured damage (:meth:`sensitivity`; ``keep_first_and_last`` is then
        not used: the ends are measured too), ``rule`` by the criterion with the ends protected unless
        ``keep_first_and_last`` is False. Without calibration data, and with a latency budget, the rule is used."""
        check_allocation(allocation)
        measured = allocation == "measured" and latency is None and self.data is not None
        sensitivity = self.sensitivity(scores, round_to=round_to, min_channels=min_channels, protect=protect) \
            if measured else None
        measured = sensitivity is not None
        with self.timed("plan"):
            if latency is not None:
                from pipeline.deployment.latency_plan import plan_for_latency

                plan = plan_for_latency(self.prepared, scores, latency, target_macs=target_macs,
                                        target_params=target_params, round_to=round_to, min_channels=min_channels,
                                        protect=tuple(protect), keep_first_and_last=keep_first_and_last)
            else:
                plan = select_channels(scores, self.prepared.index, target_macs=target_macs,
                                       target_params=target_params, round_to=round_to, min_channels=min_channels,
                                       protect=tuple(protect), keep_first_and_last=keep_first_and_last and not measured,
                                       sensitivity=sensitivity, **planner)
        if allocation == "measured" and sensitivity is None:
            why = ("a latency budget (its planner does not measure)" if latency is not None else
                   "no calibration data" if self.data is None else
                   f"over its cost cap: two widths for each movable group at {MIN_SAMPLES} samples need more than "
                   f"{STRETCH} passes over the {self.data.num_samples} calibration samples (give more data, or "
                   "--allocation rule to silence this)")
            if self.data is not None and latency is None:
                logger.warning("measured allocation skipped: %s; the rule allocation is used", why)
            plan = replace(plan, meta={**plan.meta, "allocation": {"mode": "rule", "why": why}})
        if self.task is not None:
            plan = replace(plan, meta={**plan.meta, "task": self.task.to_dict()})
        if scores.labels:
            plan = replace(plan, meta={**plan.meta, "labels": dict(scores.labels)})
        return plan.with_sha(self.prepared.sha256).with_input_shapes(self.prepared.input_shapes)

    def apply(self, plan: PruningPlan) -> onnx.ModelProto:
        """The plan applied to the canonical model, with the file's own input and output dims (verified with the
        full checker)."""
        with self.timed("apply"):
            pruned = apply_plan(self.prepared.model, self.prepared.index, keep_lists(plan), verify=False)
            verify_model(self.prepared.restore_io(pruned))
            return pruned

    def recover(self, pruned: onnx.ModelProto, plan: PruningPlan, method: str = DEFAULT_RECOVERY,
                mode: str = "sequential") -> tuple[onnx.ModelProto, dict[str, Any]]:
        """Training-free recovery of a pruned model (``method`` a key of ``RECOVERY``); returns the model and the
        recovery record of the report."""
        if method == "none":
            return pruned, {"method": "none"}
        if self.data is None:
            raise UserInputError(f"recovery {method!r} needs calibration data: pass --data (or --recover none)")
        if self.prepared.input_shapes:  # the data at the prepared sizes, as calibration checks it
            check_against_model(self.data, self.prepared.input_specs, max_batches=1)
        with self.timed("recover"):
            model, report = recover(self.prepared.model, pruned, self.prepared.index, keep_lists(plan), self.data,
                                    method=method, sequential=mode == "sequential", batch_size=self.batch_size,
                                    seed=self.seed, progress=self.progress, backend=self.backend,
                                    intra_op_threads=self.threads, spill_dir=self.work_dir, cluster=self.cluster,
                                    shard_batches=self.shard_batches)
        return model, {**report.to_dict(), "mode": mode}

    def candidate(self, method: str, *, target_macs: float | None = None, target_params: float | None = None,
                  round_to: int = 8, min_channels: int = 8, protect: Iterable[str] = (),
                  keep_first_and_last: bool = True, recover: str | None = None,
                  recover_mode: str = "sequential", target_latency: float | None = None,
                  latency: LatencyBudget | None = None, allocation: str = DEFAULT_ALLOCATION) -> Candidate:
        """score -> plan -> apply -> recover for one method and budget (``target_latency``: a latency budget measured
        as ``latency`` says, default onnxruntime CPU at batch 1)."""
        recover = DEFAULT_RECOVERY if recover is None else recover
        check_options(method, recover, recover_mode, self.data)
        before = dict(self.timings)
        if target_latency is not None:
            from pipeline.deployment.latency_plan import LatencyBudget

            latency = replace(latency, target=target_latency) if latency else LatencyBudget(target_latency)
        scores = self.scores(method)
        plan = self.plan(scores, target_macs=target_macs, target_params=target_params, round_to=round_to,
                         min_channels=min_channels, protect=protect, keep_first_and_last=keep_first_and_last,
                         latency=latency, allocation=allocation)
        model, recovery = self.recover(self.apply(plan), plan, recover, recover_mode)
        budget = {"target_macs": target_macs, "target_params": target_params, "round_to": round_to,
                  "min_channels": min_channels, "protect": sorted(protect),
                  "allocation": plan.meta.get("allocation", {}).get("mode", "rule")}
        if latency is not None:
            budget.update(target_latency=latency.target, latency=dict(plan.meta.get("latency", {})))
        spent = {k: v - before.get(k, 0.0) for k, v in self.timings.items() if v - before.get(k, 0.0) > 0}
        return Candidate(method, plan, model, recovery, budget, spent)

    def finetune(self, candidate: Candidate, options: Any = None) -> Candidate:
        """The candidate distilled from the original on the calibration data (:mod:`pipeline.training.finetune`, needs the
        ``[torch]`` extra); ``options`` a :class:`pipeline.training.finetune.FinetuneOptions` (default: seeded with the run's
        seed). The record goes to ``recovery["finetune"]``, the time to ``timings["finetune"]``."""
        from pipeline.training.finetune import FinetuneOptions, finetune, probe_channels

        options = options or FinetuneOptions(seed=self.seed)
        if self.data is None:
            raise UserInputError("finetune needs calibration data: pass --data")
        features = probe_channels(self.prepared, candidate.plan.keep, candidate.model) if options.feature_weight else None
        with self.timed("finetune"):
            model, record = finetune(candidate.model, self.prepared.model, self.data, options, features=features,
                                     progress=self.progress)
        return replace(candidate, model=model, recovery={**candidate.recovery, "finetune": record.to_dict()},
                       timings_s={**candidate.timings_s, "finetune": record.seconds})

    def cost(self, model: onnx.ModelProto) -> CostReport:
        """MACs and params of a model of this run at the prepared input sizes (its declared shapes when none were
        given)."""
        return self.prepared.count(model)

    def evaluate(self, model: onnx.ModelProto, data: Any, *, reference: bool = True) -> dict[str, Any]:
        """Held-out metrics of a model of this run (and its agreement with the original when ``reference``);
        ``data`` is restricted to the run's task (:meth:`task_data`) by the caller."""
        from pipeline.evaluation.evaluate import evaluate

        against = self.prepared.model if reference else None
        if against is None and self.scored_against_original(data):
            against = model  # no dense labels: the original is scored against its own decisions (1.0)
        with self.timed("evaluate"):
            return evaluate(model, data, reference=against, backend=self.backend, intra_op_threads=self.threads,
                            progress=self.progress, output_kind=self.labels.output_kind,
                            decode=self.labels.decode).to_dict()

    def dense_kind(self) -> str | None:
        """The dense kind of the model's first output (``sequence``, ``map``, ``yolo``; ``--output-kind`` or
        detected), None for a classifier or an output the rules cannot tell (scored by fidelity only)."""
        from pipeline.evaluation.evaluate import scored_kind

        model = self.prepared.model
        return None if is_classifier(model) else scored_kind(model, self.labels.output_kind)

    def scored_against_original(self, data: Any) -> bool:
        """True when a dense model is scored against the original's decisions (the data has no dense labels)."""
        return self.dense_kind() is not None and getattr(data, "targets", None) is None


def check_allocation(allocation: str) -> None:
    """Refuse an unknown allocation mode."""
    if allocation not in ALLOCATIONS:
        raise UserInputError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")


def check_options(method: str, recover: str, recover_mode: str, data: Any | None) -> None:
    """Refuse unknown methods, recoveries and modes, and data-driven work without data, before any work."""
    if method not in SCORERS:
        raise UserInputError(f"unknown method {method!r}; choose one of {', '.join(sorted(SCORERS))}")
    if recover not in RECOVERY:
        raise UserInputError(f"unknown recovery {recover!r}; choose one of {sorted(RECOVERY)}")
    if recover_mode not in RECOVER_MODES:
        raise UserInputError(f"unknown recovery mode {recover_mode!r}; choose 'sequential' or 'one-pass'")
    if data is None and (recover != "none" or needs_stats(method)):
        raise UserInputError(f"method {method!r} with recovery {recover!r} needs calibration data: pass --data "
                             "(or use a data-free method with --recover none)")



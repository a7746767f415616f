"""The one-shot job of ``diprune prune`` (:func:`prune`): options checked, one candidate made on a
:class:`pipeline.prune.orchestrate.PruneRun` (or the smallest within an accuracy drop, :func:`smallest_within`),
then evaluated, quantized or converted as asked, and written atomically with its plan and report
(:func:`write_candidate`: the model only after ``onnx.checker`` passed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from graph_ops.errors import UserInputError, VerificationError
from graph_ops.io import (
    EXTERNAL_DATA_THRESHOLD,
    atomic_write_bytes,
    atomic_write_files,
    check_writable,
    save_model,
    sha256_file,
)
from pipeline.calibration.calibrate import DEFAULT_POOLING
from pipeline.data.shards import SHARD_BATCHES
from pipeline.data.targets import LabelOptions
from pipeline.data.task import Task
from pipeline.evaluation.evaluate import is_classifier
from pipeline.model.prepare import as_prepared
from pipeline.prune.orchestrate import (
    DEFAULT_ALLOCATION,
    Candidate,
    PruneRun,
    check_allocation,
    check_options,
)
from pipeline.prune.report import Report
from pipeline.recovery import DEFAULT_RECOVERY
from pipeline.recovery.sweep import MIN_ROWS_PER_DIM
from pipeline.training.push import PushOptions, PushRecord, default_pushed_path, push

if TYPE_CHECKING:
    from pipeline.deployment.latency_model import LatencyTarget
    from pipeline.deployment.latency_plan import LatencyBudget

logger = logging.getLogger(__name__)


def _check_finetune(epochs: int, data: Any | None, max_drop: float | None) -> None:
    """Refuse a finetune that cannot run, before any work: no torch, no data, or with --max-drop."""
    from pipeline.model.torch_bridge import require_torch

    if epochs < 0:
        raise UserInputError(f"--finetune-epochs is a number of epochs >= 0, got {epochs}")
    if max_drop is not None:
        raise UserInputError("--finetune-epochs with --max-drop is not supported (the search evaluates models before "
                             "any finetune); give a budget (--target-macs) instead")
    if data is None:
        raise UserInputError("--finetune-epochs needs calibration data: pass --data")
    require_torch("--finetune-epochs")


def _with_advice(recovery: Mapping[str, Any]) -> dict[str, Any]:
    """The recovery record with, per refit layer, the rows it had against the advice (10 per unknown)."""
    out = dict(recovery)
    layers = [c for c in recovery.get("consumers", []) if "rows" in c and "dim" in c]
    if layers:
        below = [c["node"] for c in layers if c["rows"] < MIN_ROWS_PER_DIM * c["dim"]]
        out["advice"] = {"rows_per_unknown": MIN_ROWS_PER_DIM, "layers": len(layers), "layers_below_advice": below}
    return out


def write_candidate(run: PruneRun, candidate: Candidate, out_path: str | os.PathLike[str], *,
                    evaluation: Mapping[str, Any] | None = None, timings: Mapping[str, float] | None = None,
                    search: tuple[Mapping[str, Any], ...] = (), extra_files: Mapping[Path, bytes] | None = None,
                    artifacts: Mapping[str, Any] | None = None) -> Report:
    """Write ``out_path``, ``<out>.plan.json`` and ``<out>.report.json`` (and ``extra_files``, e.g. the INT8 model)
    all or nothing and return the report.

    The three files are written to temporary files first and renamed into place together; when one cannot be
    written, none is left behind. (A model over 1.8 GB is saved first, with its external data, and removed again
    when the plan or the report cannot be written.)
    """
    out_path = Path(out_path)
    plan_path, report_path = Path(f"{out_path}.plan.json"), Path(f"{out_path}.report.json")
    for path in (out_path, plan_path, report_path, *(extra_files or {})):
        check_writable(path, run.prepared.path)
    data = candidate.model.SerializeToString() if candidate.model.ByteSize() < EXTERNAL_DATA_THRESHOLD else None
    if data is None:
        save_model(candidate.model, out_path)
    report = candidate_report(run, candidate, out_path, hashlib.sha256(data).hexdigest() if data is not None
                              else sha256_file(out_path), evaluation=evaluation, timings=timings, search=search)
    if artifacts:
        report = replace(report, artifacts=dict(artifacts))
    files = {plan_path: candidate.plan.to_json().encode(), report_path: report.to_json().encode(),
             **(extra_files or {})}
    try:
        atomic_write_files({out_path: data, **files} if data is not None else files)
    except BaseException:
        if data is None:
            out_path.unlink(missing_ok=True)
        raise
    return report


def candidate_report(run: PruneRun, candidate: Candidate, out_path: Path, output_sha256: str, *,
                     evaluation: Mapping[str, Any] | None = None, timings: Mapping[str, float] | None = None,
                     search: tuple[Mapping[str, Any], ...] = ()) -> Report:
    """The report of a candidate written to ``out_path`` (whose bytes have ``output_sha256``)."""
    before, after = run.prepared.cost, run.cost(candidate.model)
    index = run.prepared.index
    groups = {g.id: {"size": g.size, "kept": len(candidate.plan.keep.get(g.id, range(g.size)))} for g in index.groups}
    notes = tuple(str(n) for n in candidate.plan.meta.get("notes", ()))
    return Report(
        model=str(run.prepared.path), model_sha256=run.prepared.sha256, output=str(out_path),
        output_sha256=output_sha256, method=candidate.method, budget=dict(candidate.budget),
        original={"macs": None if before.unresolved else before.macs, "params": before.params},
        pruned={"macs": None if after.unresolved else after.macs, "params": after.params},
        groups=groups, timings_s=dict(timings if timings is not None else candidate.timings_s),
        evaluation=dict(evaluation or {}), notes=notes, recovery=_with_advice(candidate.recovery),
        task=run.task_record(), search=search, calibration=run.calibration_record())


SEARCH_STEPS = 6
"""Bisection steps of ``--max-drop`` after the smallest reachable model (each one a prune + recovery + evaluation)."""


_FLOOR_TARGET = 1e-6  # a MACs target no plan reaches: the planner stops at every group's floor


def smallest_within(run: PruneRun, method: str, eval_data: Any, max_drop: float, *, steps: int = SEARCH_STEPS,
                    **options: Any) -> tuple[Candidate, dict[str, Any], tuple[dict[str, Any], ...]]:
    """The smallest model (by achieved MACs) whose held-out score (top-1; a dense model's primary metric:
    :func:`pipeline.evaluation.evaluate.score`) stays within ``max_drop`` points of the unpruned model's, found on one calibration: first the smallest reachable model (every group at its floor), then a
    geometric bisection of the MACs target between the largest failing and the smallest passing achieved fraction.
    Accuracy is not guaranteed monotone in the budget, so this is a search, not a proof; every tried budget is
    returned.

    Returns:
        The best candidate, its evaluation ``{"original": ..., "pruned": ...}`` and the tried budgets.

    Raises:
        VerificationError: no tried budget keeps the accuracy within the bound (nothing is written).
    """
    if max_drop < 0:
        raise UserInputError(f"--max-drop is a number of accuracy points >= 0, got {max_drop}")
    from pipeline.evaluation.evaluate import score

    original = run.evaluate(run.prepared.model, eval_data, reference=False)
    metric, base = score(original)
    if base is None:
        raise UserInputError("--max-drop needs labelled evaluation data (top-1 accuracy), or a dense model (its "
                             "primary metric, against dense labels or the original's decisions)")
    bound = base - max_drop / 100.0
    full = run.prepared.cost.macs
    tried: list[dict[str, Any]] = []
    best: tuple[float, Candidate, dict[str, Any]] | None = None
    low, high = None, 1.0
    target = _FLOOR_TARGET  # first: the smallest reachable model
    for _ in range(steps + 1):
        candidate = run.candidate(method, target_macs=target, **options)
        pruned = run.evaluate(candidate.model, eval_data)
        achieved = run.cost(candidate.model).macs / full
        value = score(pruned)[1]
        passed = value is not None and value >= bound
        tried.append({"target_macs": round(target, 6), "macs_fraction": round(achieved, 6), metric: value,
                      "drop_points": None if value is None else round(100 * (base - value), 3), "within": passed})
        logger.info("--max-drop search: target %.4f -> MACs %.4f, %s %s (%s)", target, achieved, metric, value,
                    "within" if passed else "outside")
        if passed and (best is None or achieved < best[0]):
            best = (achieved, candidate, pruned)
        if passed:
            high = min(high, achieved)
            if low is None:
                break  # the smallest reachable model is within the bound
        else:
            low = achieved if low is None else max(low, achieved)
        if low is not None and high / low < 1.02:
            break
        target = float(np.sqrt(low * high)) if low is not None else 1.0
    if best is None:
        raise VerificationError(f"no tried budget keeps the held-out {metric} within {max_drop} points of the "
                                f"unpruned model's {base:.4f}: " + "; ".join(
                                    f"MACs {t['macs_fraction']:.3f} -> {t[metric]}" for t in tried))
    return _searched(best[1], max_drop), {"original": original, "pruned": best[2]}, tuple(tried)


def _searched(candidate: Candidate, max_drop: float) -> Candidate:
    """The candidate a ``--max-drop`` search chose, with the search as its budget: ``max_drop`` recorded, and when it
    is the smallest reachable model (asked for with a MACs target no plan can reach) its "budget not reached" note
    replaced by what it is."""
    budget = {**candidate.budget, "max_drop": max_drop}
    if budget.get("target_macs") != _FLOOR_TARGET:
        return replace(candidate, budget=budget)
    notes = [n for n in candidate.plan.meta.get("notes", ()) if not str(n).startswith("budget not reached")]
    notes.append(f"--max-drop {max_drop:g}: the smallest reachable model (every movable group at its floor) is "
                 f"within the bound")
    plan = replace(candidate.plan, meta={**candidate.plan.meta, "notes": notes, "target_macs": None})
    return replace(candidate, plan=plan, budget={**budget, "target_macs": None})


def prune(model_path: str | Path, out_path: str | Path, *, data: object | None, method: str = "di",
          target_macs: float | None = None, target_params: float | None = None, round_to: int = 8,
          min_channels: int = 8, protect: Iterable[str] = (), pooling: str = DEFAULT_POOLING,
          batch_size: int = 64,
          eval_data: object | None = None, seed: int = 0, progress: bool = True, recover: str | None = None,
          recover_mode: str = "sequential", task: Task | None = None, max_drop: float | None = None,
          robustness: bool = False, keep_first_and_last: bool = True,
          input_shapes: Mapping[str, tuple[int, ...]] | None = None, cluster: Any | None = None,
          shard_batches: int = SHARD_BATCHES, latency: LatencyBudget | None = None,
          quantize: str | None = None, max_top1_drop: float | None = None, int8_ranking: str = "di",
          timing: LatencyTarget | None = None, finetune_epochs: int = 0,
          allocation: str = DEFAULT_ALLOCATION, steps: int = 1, int8_calibration: str | None = None,
          fp16: bool = False, fp16_keep_io_types: bool = True, fp16_block: Iterable[str] = (),
          labels: LabelOptions | None = None) -> Report:
    """Prune a model file to a budget; write ``out_path``, ``<out>.plan.json`` and ``<out>.report.json``.

    ``data`` and ``eval_data`` are :class:`pipeline.data.datasets.Dataset` objects (calibration from the training split only,
    evaluation from held-out data). Data-free methods (``l1``, ``l2``, ``random``) accept ``data=None`` when
    ``recover="none"``. ``recover`` (a key of ``pipeline.recovery.RECOVERY``; default
    ``pipeline.recovery.DEFAULT_RECOVERY``) refits the layers affected by the removed channels by least squares on
    the calibration data; ``recover_mode`` is ``sequential`` (layer by layer, inputs from the partly recovered
    model) or ``one-pass``. ``allocation`` (:data:`ALLOCATIONS`): ``measured`` ranks the groups by their measured
    damage, ends included; ``rule`` by the criterion, where ``keep_first_and_last`` protects the first layer and the
    classifier input. ``steps`` > 1 reaches the budget in that many rounds of calibrate -> score -> plan -> apply
    -> recover on the recovered model (:mod:`pipeline.selection.progressive`; the plan still applies to the original). ``task``
    restricts the model's head and both datasets to the user's task (:mod:`pipeline.data.task`). ``max_drop`` (accuracy
    points, instead of a budget) searches for the smallest model within that many points of the unpruned model on
    ``eval_data`` (:func:`smallest_within`). ``robustness`` adds top-1 and agreement under noise and adversarial
    examples to the evaluation (:mod:`pipeline.evaluation.robustness`). ``cluster`` (:class:`pipeline.cluster.RayOptions`)
    computes calibration and recovery shards on Ray, started once for the run. ``latency``
    (:class:`pipeline.deployment.latency_plan.LatencyBudget`) is a budget of measured latency (alone or with the MACs / params
    budgets). ``quantize="int8"`` also writes ``OUT.int8.onnx``, the pruned model quantized with onnxruntime
    (``max_top1_drop``: DI-guided mixed precision, ``int8_ranking`` ``di`` or ``magnitude``), and the report's
    ``evaluation.int8`` compares original and pruned models in fp32 and int8 (:mod:`pipeline.deployment.int8_stage`), timed on
    ``timing`` (default: the latency budget's target, else onnxruntime CPU at batch 1), with the INT8 recipe of
    ``timing.backend`` (:data:`pipeline.deployment.quantize.BACKEND_RECIPES`: TensorRT's symmetric int8 for ``tensorrt`` /
    ``ort-trt``) and ``int8_calibration`` (minmax, percentile, entropy; default the recipe's). ``fp16`` also writes
    ``OUT.fp16.onnx`` (:mod:`pipeline.deployment.fp16`; ``fp16_keep_io_types``, ``fp16_block``: ops kept fp32) and the
    report's ``evaluation.fp16``. The report's ``artifacts`` name each file written, its precision, what runs it and
    the command that builds and times it on the target (:mod:`pipeline.deployment.deploy`). ``finetune_epochs`` > 0
    distils the original into the recovered model for that many epochs on ``data`` before it is evaluated and
    written (:meth:`PruneRun.finetune`). ``labels`` (:class:`pipeline.data.targets.LabelOptions`): where the labels of
    ``di`` / ``lda`` / ``pls-vip`` come from (default: the data's, else the model's own decisions; dense outputs and
    labels make calibration location-aware). One :class:`PruneRun` chains the stages; the report's ``timings_s`` has
    one entry per stage that ran.
    """
    from pipeline.deployment.int8_stage import check_int8_options, int8_path

    recover = DEFAULT_RECOVERY if recover is None else recover
    if robustness and eval_data is None:
        raise UserInputError("--robustness needs held-out data: pass --eval-data")
    out_path = check_writable(out_path, model_path)
    for sibling in (f"{out_path}.plan.json", f"{out_path}.report.json"):
        check_writable(sibling, model_path)
    check_options(method, recover, recover_mode, data)
    check_allocation(allocation)
    check_int8_options(quantize, max_top1_drop, int8_ranking, eval_data, data, int8_calibration)
    if quantize is not None:
        check_writable(int8_path(out_path), model_path)
    if fp16:
        from pipeline.deployment.fp16 import fp16_path

        check_writable(fp16_path(out_path), model_path)
    if max_drop is not None and eval_data is None:
        raise UserInputError("--max-drop needs held-out data to measure the accuracy: pass --eval-data")
    if max_drop is None and target_macs is None and target_params is None and latency is None:
        raise UserInputError("give a budget: --target-macs F, --target-params F or --target-latency F (fraction "
                             "kept), or --max-drop P")
    if finetune_epochs:
        _check_finetune(finetune_epochs, data, max_drop)
    if steps < 1 or (steps > 1 and (max_drop is not None or latency is not None)):
        raise UserInputError(f"--steps is a number of rounds >= 1 and, above 1, needs --target-macs/--target-params "
                             f"(not --max-drop or --target-latency); got {steps}")
    with ray_started(cluster, data):
        run = PruneRun(model_path, data, pooling=pooling, batch_size=batch_size, seed=seed, progress=progress,
                       work_dir=out_path.resolve().parent, task=task, input_shapes=input_shapes, cluster=cluster,
                       shard_batches=shard_batches, labels=labels)
        return _prune_run(run, out_path, method, eval_data, max_drop, target_macs, target_params,
                          {"round_to": round_to, "min_channels": min_channels, "protect": protect, "recover": recover,
                           "recover_mode": recover_mode, "keep_first_and_last": keep_first_and_last,
                           "allocation": allocation},
                          robustness=robustness, latency=latency, quantize=quantize, max_top1_drop=max_top1_drop,
                          int8_ranking=int8_ranking, timing=timing, finetune_epochs=finetune_epochs, steps=steps,
                          deploy={"int8_calibration": int8_calibration, "fp16": fp16,
                                  "fp16_keep_io_types": fp16_keep_io_types, "fp16_block": tuple(fp16_block)})


@contextmanager
def ray_started(cluster: Any | None, data: Any | None = None) -> Iterator[None]:
    """Ray started (or connected) for the block when ``cluster`` is given, so that every stage reuses it; ``data``
    that Ray workers cannot reopen (in-memory arrays) is refused first, before any work."""
    if cluster is None:
        yield
        return
    from pipeline.cluster import data_spec, ray_session

    if data is not None:
        data_spec(data)

    with ray_session(cluster):
        yield


def _prune_run(run: PruneRun, out_path: Path, method: str, eval_data: Any, max_drop: float | None,
               target_macs: float | None, target_params: float | None, options: dict[str, Any], *,
               robustness: bool = False, latency: LatencyBudget | None = None, quantize: str | None = None,
               max_top1_drop: float | None = None, int8_ranking: str = "di",
               timing: LatencyTarget | None = None, finetune_epochs: int = 0, steps: int = 1,
               deploy: Mapping[str, Any] | None = None) -> Report:
    eval_data = run.check_data(run.task_data(eval_data, "evaluation"), "evaluation", labels=True)
    deploy = dict(deploy or {})
    search: tuple[dict[str, Any], ...] = ()
    if max_drop is not None:
        candidate, evaluation, search = smallest_within(run, method, eval_data, max_drop, **options)
    else:
        if steps > 1:
            from pipeline.selection.progressive import progressive

            measure = None if eval_data is None else (lambda model: run.evaluate(model, eval_data))
            candidate = progressive(run, method, steps, target_macs=target_macs, target_params=target_params,
                                    evaluate=measure, **options)
        else:
            candidate = run.candidate(method, target_macs=target_macs, target_params=target_params, latency=latency,
                                      **options)
        if finetune_epochs:
            from pipeline.training.finetune import FinetuneOptions

            candidate = run.finetune(candidate, FinetuneOptions(epochs=finetune_epochs, seed=run.seed))
        evaluation = {}
        if eval_data is not None:
            original = run.evaluate(run.prepared.model, eval_data, reference=False) if is_classifier(
                run.prepared.model) or run.dense_kind() else None  # an output of no known kind: nothing to score
            evaluation = {"original": original, "pruned": run.evaluate(candidate.model, eval_data)}
    if robustness:
        from pipeline.evaluation.robustness import robustness as measure_robustness

        with run.timed("robustness"):
            evaluation["robustness"] = measure_robustness(run.prepared.model, candidate.model, eval_data,
                                                          seed=run.seed, backend=run.backend)
    extra = {}
    from pipeline.deployment.deploy import artifact_record
    from pipeline.deployment.latency_model import LatencyTarget

    timing = timing or (latency.on if latency is not None else LatencyTarget())
    artifacts = {"fp32": artifact_record(out_path, "fp32", timing.backend, candidate.model, batch=timing.batch)}
    if quantize is not None:
        from pipeline.deployment.int8_stage import int8_path, int8_stage
        from pipeline.deployment.quantize import BACKEND_RECIPES, INT8_RECIPES

        recipe = BACKEND_RECIPES.get(timing.backend, "x86")
        with run.timed("int8"):
            quantized, evaluation["int8"] = int8_stage(
                run.prepared.model, candidate.model, run.data,
                None if eval_data is None else (lambda m: run.evaluate(m, eval_data)),
                timing, max_top1_drop=max_top1_drop,
                ranking=int8_ranking, workdir=out_path.resolve().parent, recipe=recipe,
                calibration=deploy.get("int8_calibration"), input_shapes=run.prepared.input_shapes)
        extra[int8_path(out_path)] = quantized.SerializeToString()
        artifacts["int8"] = artifact_record(int8_path(out_path), "int8", timing.backend, quantized,
                                            batch=timing.batch, meant_for=INT8_RECIPES[recipe].meant_for)
    if deploy.get("fp16"):
        from pipeline.deployment.fp16 import fp16_path, fp16_stage
        from pipeline.evaluation.evaluate import evaluate as evaluate_model

        def compare(model: onnx.ModelProto, reference: onnx.ModelProto | None) -> dict[str, Any]:
            return evaluate_model(model, eval_data, reference=reference, backend="ort-cpu",
                                  intra_op_threads=run.threads).to_dict()

        with run.timed("fp16"):
            half, evaluation["fp16"] = fp16_stage(candidate.model, None if eval_data is None else compare,
                                                  keep_io_types=deploy.get("fp16_keep_io_types", True),
                                                  op_block_list=deploy.get("fp16_block", ()))
        extra[fp16_path(out_path)] = half.SerializeToString()
        artifacts["fp16"] = artifact_record(fp16_path(out_path), "fp16", timing.backend, half, batch=timing.batch)
    return write_candidate(run, candidate, out_path, evaluation=evaluation, timings=run.timings, search=search,
                           extra_files=extra, artifacts=artifacts)


def push_and_prune(model_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, data: Any,
                   options: PushOptions | None = None, pushed_path: str | os.PathLike[str] | None = None,
                   eval_data: Any | None = None, progress: bool = True, source: str | None = None,
                   **prune_options: Any) -> tuple[Any, PushRecord]:
    """Push the model, write it, then prune it (:func:`pipeline.prune.one_shot.prune` with ``prune_options``).

    Writes ``pushed_path`` (default :func:`default_pushed_path`) and ``<pushed>.push.json`` (the record, with the
    held-out top-1 of the original and the pushed model when ``eval_data`` is given), then ``out_path`` with its
    plan and report. ``source`` names the model in the record when ``model_path`` is an intermediate file (a torch
    spec exported first). Returns the prune report and the push record.
    """
    pushed_path = Path(pushed_path) if pushed_path is not None else default_pushed_path(out_path)
    for path in (pushed_path, Path(f"{pushed_path}.push.json"), Path(out_path)):
        check_writable(path, model_path)
    if Path(pushed_path).resolve() == Path(out_path).resolve():
        raise UserInputError("the pushed model and the pruned output must be different files")
    prepared = as_prepared(model_path)
    pushed, record = push(prepared, data, options, progress=progress)
    doc = {"format": "diprune.push/1", "model": source or str(model_path), "model_sha256": prepared.sha256,
           "pushed": str(pushed_path), **record.to_dict()}
    if eval_data is not None:
        from pipeline.evaluation.evaluate import evaluate

        doc["evaluation"] = {"original": evaluate(prepared.model, eval_data).to_dict(),
                             "pushed": evaluate(pushed, eval_data, reference=prepared.model).to_dict()}
    atomic_write_bytes(pushed_path, pushed.SerializeToString())
    atomic_write_bytes(Path(f"{pushed_path}.push.json"), (json.dumps(doc, indent=1) + "\n").encode())
    report = prune(pushed_path, out_path, data=data, eval_data=eval_data, progress=progress, **prune_options)
    return report, record

"""Latency as the budget (issue 12): measured speedup against the requested one, MACs plans of equal measured
latency, the latency model's prediction error, accuracy at matched latency, and INT8 after pruning.

Everything runs on onnxruntime CPU, 1 intra-op thread, batch 1 (the torchvision stage also at ``--batch N``), on the
machine recorded in the results.

Stage ``torchvision`` (resnet50, vgg16, mobilenet_v2, efficientnet_b0 at 224x224, seeded random weights, exported as
``benchmarks/latency.py`` does; data-free ``l2`` scores, since random weights carry no class information). Per model
the latency model is measured (:mod:`pipeline.deployment.latency_model`; its held-out error is recorded), then per requested
fraction ``F`` in (0.5, 0.33):

* ``latency``: the latency plan for ``F`` (:func:`pipeline.deployment.latency_plan.plan_for_latency`, closed loop);
* ``macs F``: the MACs plan with ``target_macs = F`` (what a MACs budget gives when F is taken at its word);
* ``macs =lat``: the MACs plan whose measured latency equals the latency plan's (the same closed loop, driving
  ``target_macs``; :func:`pipeline.deployment.latency_plan.closed_loop`).

The original and all of these are then timed again together in one set of interleaved rounds (the reported
numbers): ``ratio`` = median over rounds of plan / original, ``speedup = 1 / ratio``, ``efficiency`` = measured
speedup / requested speedup ``= F / ratio`` (goal >= 0.9, i.e. within 10 %), ``pred. error`` = the latency model's
predicted ratio / measured ratio - 1, ``lost`` = the planner's information lost (sum over groups of the removed
l2 score mass, a fraction per group).

Stage ``mnist`` (the MNIST families and the demo CNN; DI scores on 2,000 training digits, ``lstsq`` recovery,
top-1 on the 2,000 held-out digits): per ``F``, the latency plan and the MACs plan of equal measured latency, both
recovered, evaluated and timed together with the original. The match: every MACs plan the closed loop on
``target_macs`` measured, plus ``MATCH_GRID`` MACs budgets spaced geometrically from 0.85x the smallest to 1.15x
the largest of its tries, is timed again in the latency plan's rounds and the one nearest its ratio is taken. With
one held-out digit worth 0.05 points, the two models are also compared sample by sample (exact McNemar test: the
digits only one of them gets right, and the probability of a split at least that uneven if both were equally
accurate). Pruned models are kept in ``--work`` for the next stage.

Stage ``int8`` (the same models): original fp32 / original int8 / pruned fp32 (the latency plan at 0.5) / pruned
int8 (uniform), top-1 and speedup in one set of interleaved rounds; then mixed precision on the pruned model at
the accuracy target ``--max-top1-drop`` (points below the pruned fp32 model) with the ``di`` and the ``magnitude``
rankings, against uniform int8: layers kept fp32, top-1, speedup.

Run from the repository root: ``python -m benchmarks.latency_budget --stage torchvision|mnist|int8|report``; each
stage merges its part into ``benchmarks/results/latency_budget.json``; ``report`` (also run after every stage)
writes ``latency_budget.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.output import torchvision_onnx
from benchmarks.quality import locked_doc, merge
from benchmarks.selection import MODELS as MNIST_MODELS
from graph_ops.io import save_model
from graph_ops.prune import apply_plan
from pipeline.data.named import open_dataset
from pipeline.deployment.bench import machine_info
from pipeline.deployment.int8_stage import QUANTIZATION
from pipeline.deployment.latency_build import latency_model_for
from pipeline.deployment.latency_model import LatencyTarget
from pipeline.deployment.latency_plan import (
    LatencyBudget,
    closed_loop,
    measure_plan,
    plan_for_latency,
    with_information_lost,
)
from pipeline.deployment.mixed_precision import search_mixed_precision
from pipeline.deployment.quantize import Int8Quantizer, compare_precisions
from pipeline.deployment.timing import interleaved_ratios
from pipeline.evaluation.evaluate import evaluate
from pipeline.model.prepare import prepare
from pipeline.model.runtime import model_input_specs, open_session, stream
from pipeline.prune.orchestrate import PruneRun, keep_lists
from pipeline.selection.allocate import select_channels
from pipeline.selection.plan import PruningPlan

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "latency_budget.json"
TORCHVISION = ("resnet50", "vgg16", "mobilenet_v2", "efficientnet_b0")
MNIST = ("vgg", "resnet", "mobilenet", "inception", "lenet", "cnn")
TARGETS = (0.5, 0.33)
INT8_TARGET = 0.5
ON = LatencyTarget(backend="ort-cpu", batch=1, threads=1)
FINAL_ROUNDS = 11
MATCH_GRID = 6  # MACs budgets added around the closed loop's tries when matching a latency plan (MNIST stage)


def _plan_row(plan: PruningPlan, measured: float, target: float, predicted: float | None) -> dict[str, Any]:
    meta = plan.meta
    return {"macs_fraction": round(meta["macs_fraction"], 4), "params_fraction": round(meta["params_fraction"], 4),
            "ratio": round(measured, 4), "speedup": round(1 / measured, 3), "efficiency": round(target / measured, 3),
            "predicted_ratio": None if predicted is None else round(predicted, 4),
            "prediction_error": None if predicted is None else round(predicted / measured - 1, 4),
            "lost": round(float(meta.get("information_lost", 0.0)), 4)}


def _macs_plan(run: PruneRun, scores: Any, target: float) -> PruningPlan:
    plan = select_channels(scores, run.prepared.index, target_macs=target, round_to=8)
    return with_information_lost(plan, scores, run.prepared.index)


def _matched_macs(run: PruneRun, scores: Any, goal: float,
                  on: LatencyTarget = ON) -> tuple[PruningPlan, list[dict[str, Any]]]:
    """The MACs plan whose measured latency ratio is ``goal`` (closed loop on target_macs)."""
    return closed_loop(lambda aim: _macs_plan(run, scores, aim), lambda p: measure_plan(run.prepared, p, on), goal,
                       predicted=lambda p: p.meta["macs_fraction"], iterations=5)


def _final_timing(run: PruneRun, plans: Sequence[PruningPlan], on: LatencyTarget = ON) -> list[float]:
    """The plans' latency ratios to the original, all in one set of interleaved rounds."""
    blobs = [run.prepared.model.SerializeToString()]
    blobs += [apply_plan(run.prepared.model, run.prepared.index, keep_lists(p), verify=False).SerializeToString()
              for p in plans]
    return list(interleaved_ratios(blobs, backend=on.backend, batch=on.batch, threads=on.threads,
                                   rounds=FINAL_ROUNDS, round_seconds=0.2, seed=0).ratios[1:])


def torchvision_model(name: str, work: Path, on: LatencyTarget = ON) -> dict[str, Any]:
    """The torchvision stage for one model (module docstring), measured on ``on`` (its batch)."""
    run = PruneRun(torchvision_onnx(name, work), None, progress=False)
    scores = run.scores("l2")
    start = time.perf_counter()
    model = latency_model_for(run.prepared, on, work / "cache")
    built = time.perf_counter() - start
    entry: dict[str, Any] = {"latency_model": {"seconds": round(built, 1), "kernels": len(model.kernels),
                                               "block": model.key["block"], "predicted_ms": model.predict_ms(),
                                               "validation": dict(model.validation)}, "targets": {}}
    for target in TARGETS:
        latency_plan = plan_for_latency(run.prepared, scores, LatencyBudget(target, on), model=model)
        tries = latency_plan.meta["latency"]["tries"]
        naive = _macs_plan(run, scores, target)
        matched, matched_tries = _matched_macs(run, scores, latency_plan.meta["latency"]["measured_ratio"], on)
        ratios = _final_timing(run, [latency_plan, naive, matched], on)
        entry["targets"][str(target)] = {
            "latency": {**_plan_row(latency_plan, ratios[0], target, model.ratio(_widths(run, latency_plan))),
                        "tries": tries},
            "macs F": _plan_row(naive, ratios[1], target, model.ratio(_widths(run, naive))),
            "macs =lat": {**_plan_row(matched, ratios[2], target, model.ratio(_widths(run, matched))),
                          "tries": matched_tries}}
        logger.info("%s F=%s: latency plan x%.3f, macs x%.3f, matched macs x%.3f", name, target, *ratios)
    return entry


def _torchvision_key(batch: int) -> str:
    """Where a torchvision stage's results go: ``torchvision`` at batch 1, ``torchvision-batch<N>`` otherwise."""
    return "torchvision" if batch == 1 else f"torchvision-batch{batch}"


def _widths(run: PruneRun, plan: PruningPlan) -> dict[str, int]:
    return {gid: len(keep) for gid, keep in plan.keep.items()}


def _keep_key(plan: PruningPlan) -> tuple:
    return tuple(sorted((gid, tuple(keep)) for gid, keep in plan.keep.items()))


def _correct(model: onnx.ModelProto, test: Any) -> np.ndarray:
    """Per held-out sample, whether the model's top-1 class is its label."""
    session = open_session(model.SerializeToString(), "ort-cpu", 1)
    right = [batch.outputs[0].argmax(axis=1) == batch.labels
             for batch in stream(session, test, None, model_input_specs(model), batch_size=256, stage="evaluate")]
    return np.concatenate(right)


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Exact two-sided McNemar test of two classifiers on the same samples (``a``, ``b``: per-sample correct):
    ``a_only`` / ``b_only`` are the samples only one gets right; ``p`` the probability of a split at least this
    uneven if both were equally accurate (binomial, 1/2)."""
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"a_only": only_a, "b_only": only_b, "p": round(p, 4)}


def mnist_model(name: str, work: Path, cal: Any, test: Any) -> dict[str, Any]:
    """The mnist stage for one model (module docstring)."""
    run = PruneRun(MNIST_MODELS[name], cal, progress=False)
    scores = run.scores("di")
    model = latency_model_for(run.prepared, ON, work / "cache")
    original = evaluate(run.prepared.model, test).top1
    entry: dict[str, Any] = {"original_top1": original, "latency_model": {"validation": dict(model.validation)},
                             "targets": {}}
    for target in TARGETS:
        latency_plan = plan_for_latency(run.prepared, scores, LatencyBudget(target, ON), model=model)
        _, tries = _matched_macs(run, scores, latency_plan.meta["latency"]["measured_ratio"])
        # every MACs plan the closed loop measured, and a grid of MACs budgets spanning them (the loop often stops
        # on one side of the goal), is timed again with the latency plan, in the same rounds; the one whose ratio
        # lands nearest the latency plan's is the match
        aims = [t["aim"] for t in tries]
        aims += list(np.geomspace(0.85 * min(aims), min(1.0, 1.15 * max(aims)), MATCH_GRID))
        candidates = list({_keep_key(plan): plan for plan in (_macs_plan(run, scores, aim)
                                                              for aim in aims)}.values())
        ratios = _final_timing(run, [latency_plan, *candidates])
        pick = min(range(len(candidates)), key=lambda i: abs(ratios[1 + i] / ratios[0] - 1))
        rows, right = {}, {}
        for label, plan, ratio in (("latency", latency_plan, ratios[0]), ("macs =lat", candidates[pick],
                                                                           ratios[1 + pick])):
            recovered, _ = run.recover(run.apply(plan), plan)
            save_model(recovered, work / f"{name}.{label.replace(' =', '-')}.{target}.onnx")
            right[label] = _correct(recovered, test)
            rows[label] = {**_plan_row(plan, ratio, target, model.ratio(_widths(run, plan))),
                           "top1": float(right[label].mean())}
        rows["macs =lat"]["candidates"] = [{"macs_fraction": round(p.meta["macs_fraction"], 4),
                                            "ratio": round(r, 4)} for p, r in zip(candidates, ratios[1:],
                                                                                 strict=True)]
        rows["paired"] = mcnemar(right["latency"], right["macs =lat"])
        entry["targets"][str(target)] = rows
        logger.info("%s F=%s: %s", name, target, {k: (v["ratio"], v["top1"]) for k, v in rows.items()
                                                  if k != "paired"})
    return entry


def int8_model(name: str, work: Path, cal: Any, test: Any, max_top1_drop: float) -> dict[str, Any]:
    """The int8 stage for one model (module docstring)."""
    original = prepare(MNIST_MODELS[name]).model
    pruned_path = work / f"{name}.latency.{INT8_TARGET}.onnx"
    if not pruned_path.is_file():
        raise SystemExit(f"{pruned_path} is missing: run --stage mnist first")
    pruned = onnx.load(str(pruned_path))
    q_original, q_pruned = Int8Quantizer(original, cal), Int8Quantizer(pruned, cal)

    def top1(m: onnx.ModelProto) -> float:
        return float(evaluate(m, test).top1)

    mixed = {ranking: search_mixed_precision(q_pruned, top1, max_top1_drop, ranking=ranking)
             for ranking in ("di", "magnitude")}
    models = {"original_fp32": original, "original_int8": q_original.quantize(), "pruned_fp32": pruned,
              "pruned_int8": q_pruned.quantize(), "pruned_mixed_di": mixed["di"].model,
              "pruned_mixed_magnitude": mixed["magnitude"].model}
    table = compare_precisions(models, lambda m: evaluate(m, test, reference=original).to_dict(), ON,
                               rounds=FINAL_ROUNDS)
    q_original.close()
    q_pruned.close()
    return {"models": table["models"], "max_top1_drop": max_top1_drop,
            "mixed": {k: {"fp32_layers": list(v.fp32_layers), "layers": len(v.sensitivity), "top1": v.top1,
                          "met": v.met, "tried": list(v.tried)} for k, v in mixed.items()}}


# ----------------------------------------------------------------------------------------------- report


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def torchvision_lines(doc: Mapping[str, Any]) -> list[str]:
    lines = ["| model | F | plan | MACs kept | measured ratio | speedup | efficiency | pred. error | lost |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in doc.items():
        for target, rows in entry["targets"].items():
            for label, row in rows.items():
                lines.append(f"| {name} | {target} | {label} | {_f(row['macs_fraction'])} | {_f(row['ratio'])} | "
                             f"{_f(row['speedup'], 2)} | {_f(row['efficiency'], 2)} | "
                             f"{_f(100 * row['prediction_error'], 1) if row['prediction_error'] is not None else '-'}"
                             f"% | {_f(row['lost'])} |")
    lines += ["", "| model | latency model: kernels | block | seconds to measure | held-out error (0.75 / 0.5 / 0.3 "
              "of every width) |", "|---|---|---|---|---|"]
    for name, entry in doc.items():
        lm = entry["latency_model"]
        errors = " / ".join(f"{100 * e:+.1f}%" for e in lm["validation"]["errors"])
        lines.append(f"| {name} | {lm['kernels']} | {lm['block']} | {lm['seconds']} | {errors} |")
    return lines


def mnist_lines(doc: Mapping[str, Any]) -> list[str]:
    lines = ["| model | F | original top-1 | latency plan: ratio / MACs / top-1 | MACs plan of equal latency: "
             "ratio / MACs / top-1 | top-1 difference (points) | digits only one gets right (latency / MACs), "
             "McNemar p |", "|---|---|---|---|---|---|---|"]
    for name, entry in doc.items():
        for target, rows in entry["targets"].items():
            lat, mac, paired = rows["latency"], rows["macs =lat"], rows.get("paired")
            test = "-" if paired is None else f"{paired['a_only']} / {paired['b_only']}, {paired['p']:.2f}"
            lines.append(f"| {name} | {target} | {entry['original_top1']:.4f} | {lat['ratio']:.3f} / "
                         f"{lat['macs_fraction']:.3f} / {lat['top1']:.4f} | {mac['ratio']:.3f} / "
                         f"{mac['macs_fraction']:.3f} / {mac['top1']:.4f} | "
                         f"{100 * (lat['top1'] - mac['top1']):+.2f} | {test} |")
    return lines


def int8_lines(doc: Mapping[str, Any]) -> list[str]:
    lines = ["| model | original fp32 | original int8 | pruned fp32 | pruned int8 | mixed (di) | mixed (magnitude) |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in doc.items():
        cells = []
        for key in ("original_fp32", "original_int8", "pruned_fp32", "pruned_int8", "pruned_mixed_di",
                    "pruned_mixed_magnitude"):
            row = entry["models"][key]
            cells.append(f"{row['top1']:.4f}, {row['speedup']:.2f}x")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", "| model | accuracy target (points below pruned fp32) | layers | fp32 layers: di | fp32 layers: "
              "magnitude | uniform int8 meets it |", "|---|---|---|---|---|---|"]
    for name, entry in doc.items():
        di, mag = entry["mixed"]["di"], entry["mixed"]["magnitude"]
        uniform = di["tried"][0]["within"]
        lines.append(f"| {name} | {entry['max_top1_drop']} | {di['layers']} | {len(di['fp32_layers'])} | "
                     f"{len(mag['fp32_layers'])} | {'yes' if uniform else 'no'} |")
    return lines


def report(path: Path = RESULT) -> str:
    with locked_doc(path) as doc:
        snapshot = dict(doc)
    machine = snapshot.get("machine", {})
    lines = ["# Latency as the budget (issue 12)", "",
             f"Machine: {machine.get('cpu')}, {machine.get('cores_available')} cores available (shared with other "
             f"jobs), onnxruntime {machine.get('versions', {}).get('onnxruntime')}; onnxruntime CPU, 1 intra-op "
             "thread, batch 1 unless a section says otherwise. Produced by `python -m benchmarks.latency_budget "
             "--stage torchvision|mnist|int8 [--batch N]`.",
             ""]
    for stage, load in snapshot.get("load", {}).items():
        lines.append(f"- Load average (1 min) of `--stage {stage}` (other jobs on the machine): "
                     f"{load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end "
                     f"({load['start_time']} to {load['end_time']} UTC).")
    lines += [f"- {note}" for note in snapshot.get("notes", ())]
    if snapshot.get("load") or snapshot.get("notes"):
        lines.append("")
    for key in sorted(k for k in snapshot if k.startswith("torchvision")):
        batch = 1 if key == "torchvision" else int(key.rsplit("batch", 1)[1])
        lines += [f"## torchvision models (random weights, l2 scores), batch {batch}", "",
                  *torchvision_lines(snapshot[key]), ""]
    if "mnist" in snapshot:
        lines += ["## Accuracy at matched measured latency (DI + lstsq, MNIST)", "", *mnist_lines(snapshot["mnist"]),
                  ""]
    if "int8" in snapshot:
        lines += ["## INT8 after pruning (top-1, speedup over original fp32)", "",
                  f"Quantization: {QUANTIZATION}; pruned = the latency plan at {INT8_TARGET}.", "",
                  *int8_lines(snapshot["int8"]), ""]
    text = "\n".join(lines)
    path.with_suffix(".md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("torchvision", "mnist", "int8", "report"), required=True)
    parser.add_argument("--models", default=None, help="comma-separated subset")
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "latency_budget")
    parser.add_argument("--batch", type=int, default=1, help="torchvision stage: the batch latency is measured at")
    parser.add_argument("--max-top1-drop", type=float, default=0.0, help="int8 stage: accuracy target in points")
    parser.add_argument("--result", type=Path, default=RESULT, help="the JSON file to merge into")
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the results' notes (how a stage was run); repeatable")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("graph_ops", "pipeline.calibration.calibrate", "pipeline.recovery", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.INFO)
    args.work.mkdir(parents=True, exist_ok=True)
    merge(args.result, ["machine"], machine_info())
    for note in args.note:
        with locked_doc(args.result) as doc:
            doc.setdefault("notes", []).append(note)
    start = {"start": os.getloadavg(), "start_time": time.strftime("%H:%M", time.gmtime())}
    cal = open_dataset("mnist", split="train", limit=2000)
    test = open_dataset("mnist", split="test")
    if args.stage == "torchvision":
        on = LatencyTarget(backend=ON.backend, batch=args.batch, threads=ON.threads)
        for name in (args.models.split(",") if args.models else TORCHVISION):
            merge(args.result, [_torchvision_key(args.batch), name], torchvision_model(name, args.work, on))
    elif args.stage == "mnist":
        for name in (args.models.split(",") if args.models else MNIST):
            merge(args.result, ["mnist", name], mnist_model(name, args.work, cal, test))
    elif args.stage == "int8":
        for name in (args.models.split(",") if args.models else MNIST):
            merge(args.result, ["int8", name], int8_model(name, args.work, cal, test, args.max_top1_drop))
    if args.stage != "report":
        run = args.stage if not args.models else f"{args.stage} --models {args.models}"
        run += f" --batch {args.batch}" if args.batch != 1 else ""
        merge(args.result, ["load", run],
              {**start, "end": os.getloadavg(), "end_time": time.strftime("%H:%M", time.gmtime())})
    print(report(args.result))


if __name__ == "__main__":
    main()

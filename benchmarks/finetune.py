"""Issue-14 benchmark: beyond training-free. DI + lstsq, then a short distillation, and Grow-Push-Prune's push first.

Protocol (the data protocol of ``benchmarks/quality.py``). Models: ``benchmarks/models/mnist_{vgg,resnet,mobilenet,
inception,lenet}.onnx`` (trained on samples 0..7999 of ``pipeline/assets/mnist10k.npz``). Calibration and recovery:
the first 2,000 training digits (``open_dataset("mnist", split="train", limit=2000)``); evaluation: the 2,000
held-out digits (split ``test``; one digit = 0.05 points). Targets: 0.125 and 0.0625 of the MACs. When the planner's
floor with the first layer and the classifier input protected lies above 1.1 x the target, the cell is made with
those ends pruned too (``keep_first_and_last=False``, what ``--prune-ends`` does) and says so (``ends_pruned``).
Rows, per family and target:

* ``di+lstsq``: ``PruneRun.candidate("di", target_macs=t)`` (the library's defaults: auto pooling, round-to 8,
  sequential R3 recovery);
* ``+ft{E}@{N}``: that model distilled with :func:`pipeline.training.finetune.finetune` (``FinetuneOptions(epochs=E)``, the
  library's defaults otherwise: KL at T=4 + 0.5 CE, Adam 1e-3 with warm-up and cosine decay, batch 64, seed 0,
  1 thread) on the first ``N`` training digits, for ``E`` in 1, 3 and ``N`` in 2,000, 8,000. The cell records
  ``kept``: finetune applies the trained weights only when they lower its training objective on the first 1,024
  samples (``objective``: before, after); otherwise the row's model IS the pruned model it started from. (Cells
  measured before ``kept`` was recorded lack it; ``--redo-unrecorded`` measures them again, deterministically.);
* ``push+di+lstsq``: the original pushed first (:func:`pipeline.training.push.push`, ``PushOptions()``: 3 epochs on the first
  2,000 training digits), then the same DI + lstsq; ``push+di+lstsq+ft3@8000``: that model distilled as above, the
  pushed model being the teacher (what ``diprune push --finetune-epochs 3`` does).

``seconds`` is the wall time of the row's own step (pruning + recovery; the finetune; the push is recorded once per
family under ``push``), ``total_seconds`` what the row cost from the unpruned model. Timings were taken on a shared
2-core machine: they are noisy, and ``load`` records the load average when each family started. Every cell is merged
into ``benchmarks/results/finetune.json`` as soon as it is done (under a lock, :func:`benchmarks.quality.merge`), and
cells already there are skipped, so an interrupted run resumes. Run from the repository root::

    python -m benchmarks.finetune --models vgg resnet            # all rows of these families
    python -m benchmarks.finetune --rows di+lstsq +ft1@2000      # only these rows
    python -m benchmarks.finetune --report                        # finetune.md from finetune.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from benchmarks.output import command_line, log_to_stderr, rewrite_markdown
from benchmarks.quality import MODELS, RESULTS, THREADS, eval_top1, merge
from pipeline.data.named import open_dataset
from pipeline.deployment.bench import machine_info
from pipeline.model.prepare import PreparedModel, prepare
from pipeline.prune.orchestrate import Candidate, PruneRun
from pipeline.training.finetune import FinetuneOptions, finetune
from pipeline.training.push import PushOptions, push

logger = logging.getLogger(__name__)

FAMILIES = tuple(MODELS)
TARGETS = (0.125, 0.0625)
N_CALIB = 2000
FINETUNES = ((1, 2000), (3, 2000), (1, 8000), (3, 8000))
PUSH_SAMPLES = 2000
PUSHED_FINETUNE = (3, 8000)
ROWS = ("di+lstsq", *(f"+ft{e}@{n}" for e, n in FINETUNES), "push+di+lstsq",
        f"push+di+lstsq+ft{PUSHED_FINETUNE[0]}@{PUSHED_FINETUNE[1]}")
GOALS = {0.125: 0.5, 0.0625: 1.0}  # points below unpruned allowed at each target
OUT = RESULTS / "finetune.json"


def _calibration(n: int) -> Any:
    return open_dataset("mnist", split="train", limit=n)


def _pruned(run: PruneRun, target: float) -> tuple[Candidate, bool, float]:
    """DI + lstsq at ``target``; with the ends pruned when the protected floor lies above 1.1 x the target."""
    start = time.perf_counter()
    candidate = run.candidate("di", target_macs=target)
    ends = run.cost(candidate.model).macs / run.prepared.cost.macs > 1.1 * target
    if ends:
        candidate = run.candidate("di", target_macs=target, keep_first_and_last=False)
    return candidate, ends, time.perf_counter() - start


def _cell(run: PruneRun, model: onnx.ModelProto, test: Any, **extra: Any) -> dict[str, Any]:
    return {"top1": eval_top1(model, test), "macs_fraction": run.cost(model).macs / run.prepared.cost.macs,
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in extra.items()}}


REDO_UNRECORDED = {"on": False}  # --redo-unrecorded: finetune cells without ``kept`` count as not done


def _done(out: Path, name: str, target: float, row: str) -> bool:
    if not out.exists():
        return False
    doc = json.loads(out.read_text())
    cell = doc.get("models", {}).get(name, {}).get(str(target), {}).get(row, {})
    if REDO_UNRECORDED["on"] and "+ft" in row and "kept" not in cell:
        return False
    return "top1" in cell


def _finetuned(out: Path, run: PruneRun, base: tuple[Candidate, bool, float], name: str, target: float, test: Any,
               rows: Sequence[str], prefix: str = "", extra_seconds: float = 0.0) -> None:
    """The finetune rows of one pruned model (the teacher is the model ``run`` prunes)."""
    candidate, ends, base_seconds = base
    for epochs, samples in FINETUNES if not prefix else (PUSHED_FINETUNE,):
        row = f"{prefix}+ft{epochs}@{samples}"
        if row not in rows or _done(out, name, target, row):
            continue
        model, record = finetune(candidate.model, run.prepared.model, _calibration(samples),
                                 FinetuneOptions(epochs=epochs, threads=THREADS))
        cell = _cell(run, model, test, seconds=record.seconds, ends_pruned=ends,
                     total_seconds=extra_seconds + base_seconds + record.seconds,
                     distill_loss=[round(record.distill_loss_before, 4), round(record.distill_loss_after, 4)],
                     objective=[round(record.objective_before, 4), round(record.objective_after, 4)],
                     kept=record.kept)
        merge(out, ["models", name, str(target), row], cell)
        logger.info("%s %s %s: %s", name, target, row, cell)


def family(out: Path, name: str, targets: Sequence[float], rows: Sequence[str]) -> None:
    """Every requested row of one family (cells already in the JSON are skipped)."""
    test = open_dataset("mnist", split="test")
    prepared = prepare(MODELS[name])
    merge(out, ["models", name, "original"], {"top1": eval_top1(prepared.model, test),
                                              "load_at_start": list(os.getloadavg())})
    run = PruneRun(prepared, _calibration(N_CALIB), backend="ort-cpu", intra_op_threads=THREADS, progress=False)
    plain = [r for r in rows if not r.startswith("push")]
    for target in targets:
        if all(_done(out, name, target, r) for r in plain):
            continue
        base = _pruned(run, target)
        if not _done(out, name, target, "di+lstsq"):
            merge(out, ["models", name, str(target), "di+lstsq"],
                  _cell(run, base[0].model, test, seconds=base[2], total_seconds=base[2], ends_pruned=base[1]))
        _finetuned(out, run, base, name, target, test, rows)
    if any(r.startswith("push") for r in rows):
        _pushed_rows(out, name, prepared, targets, rows, test)


def _pushed_rows(out: Path, name: str, prepared: PreparedModel, targets: Sequence[float], rows: Sequence[str],
                 test: Any) -> None:
    pushed_rows = [r for r in rows if r.startswith("push")]
    if all(_done(out, name, t, r) for t in targets for r in pushed_rows):
        return
    pushed, record = push(prepared, _calibration(PUSH_SAMPLES), PushOptions(threads=THREADS))
    merge(out, ["models", name, "push"], {"seconds": round(record.seconds, 2), "top1": eval_top1(pushed, test),
                                          "terms_before": record.terms_before, "terms_after": record.terms_after,
                                          "samples": record.samples, "epochs": record.options["epochs"]})
    run = PruneRun(replace(prepared, model=pushed), _calibration(N_CALIB), backend="ort-cpu",
                   intra_op_threads=THREADS, progress=False)
    for target in targets:
        base = _pruned(run, target)
        if not _done(out, name, target, "push+di+lstsq"):
            merge(out, ["models", name, str(target), "push+di+lstsq"],
                  _cell(run, base[0].model, test, seconds=base[2], total_seconds=record.seconds + base[2],
                        ends_pruned=base[1]))
        _finetuned(out, run, base, name, target, test, rows, prefix="push+di+lstsq", extra_seconds=record.seconds)


def _fmt(cell: Mapping[str, Any] | None) -> str:
    if not cell or "top1" not in cell:
        return "not run"
    ends = ", ends" if cell.get("ends_pruned") else ""
    kept = {True: "", False: "; **not kept**", None: "; kept?"}[cell.get("kept")] if "distill_loss" in cell else ""
    return f"{100 * cell['top1']:.2f} ({cell['macs_fraction']:.3f}{ends}; {cell['total_seconds']:.0f} s{kept})"


def _cells(entry: Mapping[str, Any], target: float) -> dict[str, Mapping[str, Any]]:
    return {r: c for r, c in entry.get(str(target), {}).items() if "top1" in c}


def report_lines(doc: Mapping[str, Any]) -> list[str]:
    """The markdown report: one table per target, the push record, the goal check, what was not run."""
    proto = doc.get("protocol", {})
    machine = proto.get("machine", {})
    models = {n: doc["models"][n] for n in FAMILIES if n in doc.get("models", {})}
    lines = ["# Beyond training-free: distillation and push (held-out top-1 %)", "",
             "Generated by `python -m benchmarks.finetune --report` from `finetune.json`; every number comes from "
             f"these commands: {', '.join(f'`{c}`' for c in sorted(doc.get('commands', {})))}.", "",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('cores_available', '?')} cores shared with other "
             f"benchmarks and test runs (this one ran at `nice 5`; load average when each family started: "
             + ", ".join(f"{n} {models[n]['original'].get('load_at_start', ['?'])[0]:.1f}" for n in models)
             + f"), {machine.get('platform', '?')}, torch {machine.get('versions', {}).get('torch', '?')}, "
             f"onnxruntime {machine.get('versions', {}).get('onnxruntime', '?')}, 1 thread. Wall times are therefore "
             "noisy upper bounds. Protocol: the docstring of `benchmarks/finetune.py` (calibration and training on "
             "the first 2,000 / 8,000 training digits, evaluation on the 2,000 held-out digits: one digit = 0.05 "
             "points, and the binomial standard error at 98 % is about 0.3 points).", "",
             "Cells: top-1 % (achieved MACs fraction; `ends`: first layer and classifier input pruned too, because "
             "the protected floor lay above the target; wall seconds from the unpruned model, push included). "
             "**not kept**: the finetune did not lower its training objective, so it returned the pruned model "
             "unchanged (the row repeats the model it started from); `kept?`: measured before that was recorded.",
             "", *_quality_note(models)]
    for target in TARGETS:
        lines += [f"## {target} of the MACs (goal: within {GOALS[target]} point(s) of unpruned)", "",
                  "| row | " + " | ".join(f"{n} ({100 * models[n]['original']['top1']:.2f})" for n in models) + " |",
                  "|---|" + "---|" * len(models)]
        for row in ROWS:
            lines.append(f"| {row} | " + " | ".join(
                _fmt(models[n].get(str(target), {}).get(row)) for n in models) + " |")
        lines.append("")
    lines += ["## Push (3 epochs on 2,000 digits, before pruning)", "",
              "| family | seconds | unpruned top-1 after push | sep / cov / align before | after |",
              "|---|---|---|---|---|"]
    for name, entry in models.items():
        rec = entry.get("push")
        if not rec:
            lines.append(f"| {name} | not run | | | |")
            continue
        terms = [" / ".join(f"{t[k]:.3f}" for k in ("sep", "cov", "align"))
                 for t in (rec["terms_before"], rec["terms_after"])]
        lines.append(f"| {name} | {rec['seconds']:.0f} | {100 * rec['top1']:.2f} | {terms[0]} | {terms[1]} |")
    return [*lines, "", *goal_lines(models), *missing_lines(models)]


def _quality_note(models: Mapping[str, Any]) -> list[str]:
    """How ``di+lstsq`` here compares with ``quality.json``'s DI + lstsq (gap pooling) at the same targets."""
    path = RESULTS / "quality.json"
    if not path.exists():
        return []
    quality = json.loads(path.read_text()).get("models", {})
    pairs = []
    for name in models:
        for target in TARGETS:
            there = quality.get(name, {}).get("diprune", {}).get(str(target), {}).get("di", {}).get("lstsq", {})
            here = models[name].get(str(target), {}).get("di+lstsq", {})
            if "top1" in there and "top1" in here:
                pairs.append(f"{name} at {target}: {100 * here['top1']:.2f} here, {100 * there['top1']:.2f} there")
    if not pairs:
        return []
    return ["`di+lstsq` uses the library's defaults (`pooling=auto`), not the `gap` pooling of `quality.json`'s DI + "
            "lstsq sweep, so the two differ: " + "; ".join(pairs) + ".", ""]


def goal_lines(models: Mapping[str, Any]) -> list[str]:
    """Per family and target: the fixed recipe +ft3@8000 and the best row, their gap to unpruned, the verdict."""
    lines = ["## Goal check (every row trains on at most 8,000 images)", "",
             "`+ft3@8000` is the fixed recipe; `best row` picks, per cell, the row with the highest held-out top-1, "
             "which selects on the evaluation set and so flatters by up to the noise above.", "",
             "| family | target | unpruned | +ft3@8000 (change) | best row (change) | goal met by +ft3@8000 | "
             "by best row |", "|---|---|---|---|---|---|---|"]
    verdicts: dict[str, list[bool | None]] = {}
    for name, entry in models.items():
        for target in TARGETS:
            cells = _cells(entry, target)
            original = entry["original"]["top1"]
            if not cells:
                lines.append(f"| {name} | {target} | {100 * original:.2f} | not run | not run | - | - |")
                verdicts.setdefault(name, []).append(None)
                continue
            row, best = max(cells.items(), key=lambda item: item[1]["top1"])
            fixed = cells.get("+ft3@8000")
            # rounded to the resolution (one digit = 0.05 points): 97.90 vs 98.90 is exactly 1 point, not 1.0000001
            change = round(100 * (best["top1"] - original), 2)
            fixed_change = None if fixed is None else round(100 * (fixed["top1"] - original), 2)
            fixed_met = fixed_change is not None and fixed_change >= -GOALS[target]
            verdicts.setdefault(name, []).append(None if fixed is None else fixed_met)
            fixed_text = "not run" if fixed_change is None else f"{100 * fixed['top1']:.2f} ({fixed_change:+.2f})"
            lines.append(f"| {name} | {target} | {100 * original:.2f} | {fixed_text} | {row}: {100 * best['top1']:.2f} "
                         f"({change:+.2f}) | {_met(fixed_change, target)} | {_met(change, target)} |")
    lines += ["", "Margins under 0.3 points (about one binomial standard error) are marked: there the verdict could "
              "flip with another seed or another 2,000 test digits.", "",
              "Per family, with the fixed recipe at both targets: " + "; ".join(
        f"{name} {_verdict(v)}" for name, v in verdicts.items()) + ".", ""]
    return lines


def _met(change: float | None, target: float) -> str:
    """``met``/``NOT met`` with the margin to the goal in points; a margin under 0.3 lies within the noise."""
    if change is None:
        return "-"
    margin = change + GOALS[target]
    noise = " (within noise)" if abs(margin) < 0.3 else ""
    return f"{'met' if margin >= 0 else 'NOT met'} by {abs(margin):.2f}{noise}"


def _verdict(met: Sequence[bool | None]) -> str:
    if any(m is False for m in met):
        return "NOT met"
    return "met" if all(m is True for m in met) else "not known (cells not run)"


def missing_lines(models: Mapping[str, Any]) -> list[str]:
    """The cells of the protocol that are not in the JSON."""
    missing = [f"{name} {target} {row}" for name in FAMILIES for target in TARGETS for row in ROWS
               if row not in _cells(models.get(name, {}), target)]
    if not missing:
        return ["Every cell of the protocol was measured.", ""]
    return ["## Not run", "", "These cells of the protocol were not measured (time): " + ", ".join(
        f"`{m}`" for m in missing) + ".", ""]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--report", action="store_true", help="only write finetune.md from finetune.json")
    parser.add_argument("--redo-unrecorded", action="store_true",
                        help="measure again the finetune cells that do not record whether the weights were kept")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON file (finetune.md is written beside it)")
    args = parser.parse_args(argv)
    REDO_UNRECORDED["on"] = args.redo_unrecorded
    log_to_stderr(logging.WARNING)
    if args.report:
        rewrite_markdown(args.out, report_lines)
        return 0
    command = command_line("benchmarks.finetune", argv)
    out = args.out
    merge(out, ["commands", command], time.strftime("%Y-%m-%d"))
    merge(out, ["protocol"], {"n_calib": N_CALIB, "finetunes": [list(f) for f in FINETUNES],
                              "push_samples": PUSH_SAMPLES, "targets": list(TARGETS), "threads": THREADS,
                              "n_eval": 2000, "machine": machine_info()})
    for name in args.models:
        start = time.perf_counter()
        family(out, name, args.targets, args.rows)
        merge(out, ["seconds", name], round(time.perf_counter() - start, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

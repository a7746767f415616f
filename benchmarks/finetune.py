"""Issue-14 benchmark: beyond training-free. DI + lstsq, then a short distillation, and Grow-Push-Prune's push first.

Protocol (the data protocol of ``benchmarks/quality.py``). Models: ``benchmarks/models/mnist_{vgg,resnet,mobilenet,
inception,lenet}.onnx`` (trained on samples 0..7999 of ``pipeline/data/mnist10k.npz``). Calibration and recovery:
the first 2,000 training digits (``open_dataset("mnist", split="train", limit=2000)``); evaluation: the 2,000
held-out digits (split ``test``; one digit = 0.05 points). Targets: 0.125 and 0.0625 of the MACs. When the planner's
floor with the first layer and the classifier input protected lies above 1.1 x the target, the cell is made with
those ends pruned too (``keep_first_and_last=False``, what ``--prune-ends`` does) and says so (``ends_pruned``).
Rows, per family and target:

* ``di+lstsq``: ``PruneRun.candidate("di", target_macs=t)`` (the library's defaults: auto pooling, round-to 8,
  sequential R3 recovery);
* ``+ft{E}@{N}``: that model distilled with :func:`pipeline.finetune.finetune` (``FinetuneOptions(epochs=E)``, the
  library's defaults otherwise: KL at T=4 + 0.5 CE, Adam 1e-3 with warm-up and cosine decay, batch 64, seed 0,
  1 thread) on the first ``N`` training digits, for ``E`` in 1, 3 and ``N`` in 2,000, 8,000. The cell records
  ``kept``: finetune applies the trained weights only when they lower its training objective on the first 1,024
  samples (``objective``: before, after); otherwise the row's model IS the pruned model it started from. (Cells
  measured before ``kept`` was recorded lack it; ``--redo-unrecorded`` measures them again, deterministically.);
* ``push+di+lstsq``: the original pushed first (:func:`pipeline.push.push`, ``PushOptions()``: 3 epochs on the first
  2,000 training digits), then the same DI + lstsq; ``push+di+lstsq+ft3@8000``: that model distilled as above.

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
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from benchmarks.quality import MODELS, RESULTS, THREADS, eval_top1, merge
from graph_ops.io import atomic_write_bytes
from pipeline.bench import machine_info
from pipeline.data import open_dataset
from pipeline.finetune import FinetuneOptions, finetune
from pipeline.orchestrate import Candidate, PruneRun
from pipeline.prepare import PreparedModel, prepare
from pipeline.push import PushOptions, push

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
    return f"{100 * cell['top1']:.2f} ({cell['macs_fraction']:.3f}{ends}; {cell['total_seconds']:.0f} s)"


def report_lines(doc: Mapping[str, Any]) -> list[str]:
    """The markdown report: one table per target, the goal check."""
    proto = doc.get("protocol", {})
    machine = proto.get("machine", {})
    lines = ["# Beyond training-free: distillation and push (held-out top-1 %)", "",
             f"Commands: {', '.join(f'`{c}`' for c in sorted(doc.get('commands', {})))}. Machine: "
             f"{machine.get('cpu', '?')} ({machine.get('cores_available', '?')} cores, shared with other jobs), "
             f"torch {machine.get('versions', {}).get('torch', '?')}, onnxruntime "
             f"{machine.get('versions', {}).get('onnxruntime', '?')}, 1 thread. Protocol: the docstring of "
             "`benchmarks/finetune.py`. Cells: top-1 % (achieved MACs fraction; `ends`: first layer and classifier "
             "input pruned too, the protected floor lay above the target; wall seconds from the unpruned model).", ""]
    models = doc.get("models", {})
    for target in TARGETS:
        lines += [f"## {target} of the MACs (goal: within {GOALS[target]} point(s) of unpruned)", "",
                  "| row | " + " | ".join(f"{n} ({100 * models[n]['original']['top1']:.2f})" for n in models) + " |",
                  "|---|" + "---|" * len(models)]
        for row in ROWS:
            lines.append(f"| {row} | " + " | ".join(_fmt(models[n].get(str(target), {}).get(row)) for n in models)
                         + " |")
        lines.append("")
    return [*lines, *goal_lines(models)]


def goal_lines(models: Mapping[str, Any]) -> list[str]:
    """Per family and target: the best row, its gap to unpruned, and whether the goal is met."""
    lines = ["## Goal check (best row per family and target, training on at most 8,000 images)", "",
             "| family | target | best row | top-1 change (points) | goal |", "|---|---|---|---|---|"]
    for name, entry in models.items():
        for target in TARGETS:
            cells = {r: c for r, c in entry.get(str(target), {}).items() if "top1" in c}
            if not cells:
                continue
            row, cell = max(cells.items(), key=lambda item: item[1]["top1"])
            change = 100 * (cell["top1"] - entry["original"]["top1"])
            verdict = "met" if change >= -GOALS[target] else "NOT met"
            lines.append(f"| {name} | {target} | {row} | {change:+.2f} | {verdict} |")
    return [*lines, ""]


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("graph_ops", "pipeline"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.report:
        doc = json.loads(args.out.read_text())
        atomic_write_bytes(args.out.with_suffix(".md"), "\n".join(report_lines(doc)).encode())
        return 0
    command = " ".join(["python -m benchmarks.finetune", *(sys.argv[1:] if argv is None else argv)])
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

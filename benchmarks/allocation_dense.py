"""Measured vs rule allocation on the dense tasks of the dense selection benchmark.

For calibration subsets ``s`` of ``benchmarks.dense_selection`` (256 canvases each) and each task (``--benches``:
``seq`` CTC digit lines, ``det`` YOLO-style digit detector, ``seg`` digit segmenter), each method (``--methods``:
``l2``, ``di-data`` DI with the data's labels, ``di-model`` DI with the original model's own decisions) is scored
once and planned to each target of ``--targets`` twice, with ``allocation="measured"`` (the default: groups ranked by
the damage of masking them, KL per time step / pixel for a sequence / map output, relative output error otherwise,
:mod:`pipeline.selection.sensitivity`) and ``allocation="rule"``, then recovered with lstsq; the held-out primary metric of
each (exact-sequence accuracy, mAP@0.5, mIoU). Pairs share the subset and the scores, so ``rule - measured`` per
subset is a paired difference; the report gives its mean +- SE over the subsets. Needs the trained tasks of
``python -m benchmarks.dense_tasks`` (``work/dense``). Writes ``benchmarks/results/allocation_dense.{json,md}``
(rows of an earlier run are kept; a row is keyed by task, method, target, subset and allocation).

    python -m benchmarks.allocation_dense --benches seq det seg --subsets 0 1 2 --targets 0.35 0.25
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.output import write_results

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("l2", "di-data", "di-model")


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return row.get("bench", "seq"), row["method"], row.get("target", 0.35), row["subset"], row["allocation"]


def cells(bench_name: str, subsets: list[int], targets: list[float], methods: list[str]) -> list[dict[str, Any]]:
    from benchmarks.dense_selection import DI_METHODS, THREADS, Evaluator, benches, di_run
    from graph_ops.cost import count
    from pipeline.prune.orchestrate import PruneRun

    bench = benches()[bench_name]
    prepared = bench.prepared()
    evaluate = Evaluator(bench, prepared.model)
    rows = []
    for subset in subsets:
        run = PruneRun(prepared, bench.calibration(subset, prepared.model.graph.input[0].name), backend="ort-cpu",
                       intra_op_threads=THREADS, seed=subset, progress=False, batch_size=bench.batch)
        for method in methods:
            source = di_run(bench, run, subset, DI_METHODS[method]) if method in DI_METHODS else run
            scores = source.scores("di" if method in DI_METHODS else method, seed=subset)
            for target in targets:
                for allocation in ("measured", "rule"):
                    start = time.perf_counter()
                    plan = source.plan(scores, target_macs=target, allocation=allocation)
                    model, _ = source.recover(source.apply(plan), plan, "lstsq")
                    rows.append({"bench": bench_name, "subset": subset, "method": method, "target": target,
                                 "allocation": allocation,
                                 "mode": plan.meta.get("allocation", {}).get("mode", allocation),
                                 "metric": plan.meta.get("allocation", {}).get("metric"),
                                 "primary": bench.primary,
                                 bench.primary: round(float(evaluate(model)[bench.primary]), 4),
                                 "macs": round(count(model).macs / prepared.cost.macs, 4),
                                 "seconds": round(time.perf_counter() - start, 1)})
                    print(rows[-1], flush=True)
    return rows


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# Measured vs rule allocation on the dense tasks", "",
             "Commands: " + ", ".join(f"`{c}`" for c in doc["commands"]) + f"; {doc['machine']}, onnxruntime "
             f"{doc['onnxruntime']}; lstsq recovery, held-out primary metric (seq: exact-sequence accuracy, det: "
             "mAP@0.5, seg: mIoU), the same scores planned both ways on the same calibration subset. Protocol: "
             "`benchmarks/allocation_dense.py` docstring.", "",
             "| task | target | subset | method | measured % (MACs) | rule % (MACs) | rule - measured |",
             "|---|---|---|---|---|---|---|"]
    by = {_key(r): r for r in doc["rows"]}
    diffs: dict[tuple[str, float, str], list[float]] = {}
    for bench, method, target, subset in sorted({_key(r)[:4] for r in doc["rows"]}):
        m, r = by.get((bench, method, target, subset, "measured")), by.get((bench, method, target, subset, "rule"))
        if m is None or r is None:
            continue
        metric = m.get("primary", "exact")
        diff = 100 * (r[metric] - m[metric])
        diffs.setdefault((bench, target, method), []).append(diff)
        lines.append(f"| {bench} | {target:g} | {subset} | {method} | {100 * m[metric]:.1f} ({m['macs']:.3f}) | "
                     f"{100 * r[metric]:.1f} ({r['macs']:.3f}) | {diff:+.1f} |")
    lines += ["", "Rule - measured, mean ± SE over subsets (points; `rule`/`measured`: that one ahead by > 2 SE):", "",
              "| task | target | method | rule - measured | subsets |", "|---|---|---|---|---|"]
    for (bench, target, method), values in sorted(diffs.items()):
        arr = np.asarray(values)
        se = float(arr.std(ddof=1) / np.sqrt(arr.size)) if arr.size > 1 else float("nan")
        verdict = "n=1" if arr.size < 2 else "rule" if arr.mean() > 2 * se else \
            "measured" if arr.mean() < -2 * se else "noise"
        lines.append(f"| {bench} | {target:g} | {method} | {arr.mean():+.1f} ± {se:.1f} {verdict} | {arr.size} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from benchmarks.output import command_line
    from pipeline.deployment.bench import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benches", nargs="+", choices=("seq", "det", "seg"), default=["seq"])
    parser.add_argument("--subsets", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.35])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["l2", "di-data"])
    parser.add_argument("--out", type=Path, default=RESULTS / "allocation_dense.json")
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON")
    args = parser.parse_args(argv)
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.report:
        print(write_results(args.out, old, markdown))
        return
    info = machine_info()
    commands = old.get("commands", [old["command"]] if "command" in old else [])
    command = command_line("benchmarks.allocation_dense", argv)
    doc = {"commands": [*[c for c in commands if c != command], command],
           "machine": f"{info.get('cpu', 'cpu')} ({info.get('cores_available', '?')} cores, shared with other jobs)",
           "onnxruntime": info["versions"]["onnxruntime"], "rows": list(old.get("rows", []))}
    for bench in args.benches:
        new = cells(bench, args.subsets, args.targets, args.methods)
        fresh = {_key(r) for r in new}
        doc["rows"] = [r for r in doc["rows"] if _key(r) not in fresh] + new
        write_results(args.out, doc, markdown)
    print(markdown(doc))


if __name__ == "__main__":
    main()

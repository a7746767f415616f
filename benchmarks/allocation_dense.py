"""Measured vs rule allocation on a dense task: the digit-sequence CTC recognizer of the dense selection benchmark.

For calibration subsets ``s`` of ``benchmarks.dense_selection`` (256 canvases each), l2 and DI with the data's labels
are planned to 0.35 of the MACs twice, with ``allocation="measured"`` (the default: groups ranked by the damage of
masking them, KL per time step for a sequence output, :mod:`pipeline.selection.sensitivity`) and ``allocation="rule"``, then
recovered with lstsq; the held-out exact-sequence accuracy of each. Needs the trained task of
``python -m benchmarks.dense_tasks`` (``work/dense``). Writes ``benchmarks/results/allocation_dense.{json,md}``.

    python -m benchmarks.allocation_dense --subsets 0 1 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks.output import write_results

RESULTS = Path(__file__).resolve().parent / "results"


def cells(subsets: list[int], target: float) -> list[dict[str, Any]]:
    from benchmarks.dense_selection import THREADS, Evaluator, benches, di_run
    from graph_ops.cost import count
    from pipeline.prune.orchestrate import PruneRun

    bench = benches()["seq"]
    prepared = bench.prepared()
    evaluate = Evaluator(bench, prepared.model)
    rows = []
    for subset in subsets:
        run = PruneRun(prepared, bench.calibration(subset, prepared.model.graph.input[0].name), backend="ort-cpu",
                       intra_op_threads=THREADS, seed=subset, progress=False, batch_size=bench.batch)
        for method, source in (("l2", run), ("di-data", di_run(bench, run, subset, "data"))):
            scores = source.scores("di" if method.startswith("di") else method, seed=subset)
            for allocation in ("measured", "rule"):
                start = time.perf_counter()
                plan = source.plan(scores, target_macs=target, allocation=allocation)
                model, _ = source.recover(source.apply(plan), plan, "lstsq")
                rows.append({"subset": subset, "method": method, "allocation": allocation,
                             "mode": plan.meta.get("allocation", {}).get("mode", allocation),
                             "metric": plan.meta.get("allocation", {}).get("metric"),
                             "exact": round(float(evaluate(model)["exact"]), 4),
                             "macs": round(count(model).macs / prepared.cost.macs, 4),
                             "seconds": round(time.perf_counter() - start, 1)})
                print(rows[-1], flush=True)
    return rows


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# Measured vs rule allocation on the digit-sequence recognizer (CTC)", "",
             f"`{doc['command']}`; {doc['machine']}, onnxruntime {doc['onnxruntime']}; target {doc['target']} of the MACs, lstsq recovery, held-out "
             "exact-sequence accuracy (original 64.8 %).", "",
             "| subset | method | measured: exact % (MACs) | rule: exact % (MACs) | rule - measured |", "|---|---|---|---|---|"]
    by = {(r["subset"], r["method"], r["allocation"]): r for r in doc["rows"]}
    diffs: dict[str, list[float]] = {}
    for subset, method in sorted({(r["subset"], r["method"]) for r in doc["rows"]}):
        m, r = by[(subset, method, "measured")], by[(subset, method, "rule")]
        diff = 100 * (r["exact"] - m["exact"])
        diffs.setdefault(method, []).append(diff)
        lines.append(f"| {subset} | {method} | {100 * m['exact']:.1f} ({m['macs']:.3f}) | {100 * r['exact']:.1f} "
                     f"({r['macs']:.3f}) | {diff:+.1f} |")
    lines += ["", "Mean rule - measured (points): " + ", ".join(
        f"{k} {sum(v) / len(v):+.1f} over {len(v)} subsets" for k, v in sorted(diffs.items())), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from pipeline.deployment.bench import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.35)
    args = parser.parse_args(argv)
    info = machine_info()
    doc = {"command": "python -m benchmarks.allocation_dense --subsets " + " ".join(map(str, args.subsets)),
           "machine": f"{info.get('cpu', 'cpu')} ({info.get('cores_available', '?')} cores, shared with other jobs)",
           "onnxruntime": info["versions"]["onnxruntime"], "target": args.target,
           "rows": cells(args.subsets, args.target)}
    print(write_results(RESULTS / "allocation_dense.json", doc, markdown))


if __name__ == "__main__":
    main()

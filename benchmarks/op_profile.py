"""Where the time goes: onnxruntime's per-operator profile of an original and a pruned model, side by side.

Usage (from the repository root; the vgg16 files are the ones ``python -m benchmarks.latency`` caches):
    OPENBLAS_NUM_THREADS=1 python -m benchmarks.op_profile work/latency/vgg16.onnx work/latency/vgg16.l2.25.onnx

Prints, per model, MACs and the kernel time per operator type (median over runs of the summed node times), and
writes ``benchmarks/results/op_profile.json`` with the machine. Used to explain realized-vs-MACs speedup gaps.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graph_ops.cost import count
from graph_ops.io import load_model
from pipeline.deployment.bench import machine_info

RESULT = Path(__file__).resolve().parent / "results" / "op_profile.json"


def profile(path: str, batch: int, runs: int, threads: int) -> dict:
    """Kernel time per operator type (ms per run, median over runs) and MACs of one model."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "prof")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        shape = [batch, *[d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape[1:]]]
        feeds = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        session.run(None, feeds)  # warm-up
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_run: dict[str, list[float]] = collections.defaultdict(list)
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")[1:]  # skip the warm-up run
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and starts:
            run = int(np.searchsorted(starts, event["ts"], side="right")) - 1
            if run >= 0:
                per_run[event["args"]["op_name"]].append((run, event["dur"]))
    ops = {}
    for op, items in per_run.items():
        totals = np.zeros(len(starts))
        for run, dur in items:
            totals[run] += dur
        ops[op] = float(np.median(totals)) / 1e3
    return {"model": path, "macs": int(count(load_model(path)).macs), "ms_by_op": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    rows = [profile(m, args.batch, args.runs, args.threads) for m in args.models]
    for row in rows:
        total = sum(row["ms_by_op"].values())
        shares = ", ".join(f"{op} {ms:.1f} ms" for op, ms in row["ms_by_op"].items() if ms / total > 0.005)
        print(f"{row['model']}: {row['macs'] / 1e9:.2f} GMACs, {total:.1f} ms kernel time: {shares}")
    RESULT.write_text(json.dumps({"format": "diprune.op_profile/1", "batch": args.batch, "threads": args.threads,
                                  "runs": args.runs, "machine": machine_info(), "models": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

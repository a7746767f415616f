"""What channel multiple does onnxruntime CPU want? Latency of a 3x3 conv pair at every width around 64 and 128.

Model per width w: input (N, 64, 28, 28) -> Conv 3x3 (w) -> Relu -> Conv 3x3 (64) -> output; MACs are linear in w.
Every width is measured against the range's baseline (64 or 128) in its own interleaved A B A B measurement
(``pipeline.deployment.bench.measure``; ratio = median over rounds of the per-round median ratio), so that both sides of a ratio
see the same machine load. ``efficiency`` = (MACs / median latency) relative to the baseline: 1.0 means
the width is as fast per MAC as the baseline; a width whose efficiency is clearly below its multiple-of-8
neighbours is one where rounding pays.

Run: ``python benchmarks/round_to.py [--quick] [--threads 1]``; writes ``benchmarks/results/round_to.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graph_ops.io import atomic_write_bytes
from pipeline.deployment.bench import machine_info, measure

C_IN, SIZE = 64, 28
RANGES = {"around-64": (64, range(56, 73)), "around-128": (128, range(120, 137))}
RESULT = Path(__file__).resolve().parent / "results" / "round_to.json"


def conv_pair(path: Path, width: int) -> Path:
    """The two-conv model at ``width`` (seeded weights, dynamic batch)."""
    rng = np.random.default_rng(width)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.05).astype(np.float32), n)
             for n, s in (("w1", (width, C_IN, 3, 3)), ("b1", (width,)), ("w2", (C_IN, width, 3, 3)),
                          ("b2", (C_IN,)))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["output"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, f"pair{width}",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", C_IN, SIZE, SIZE])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", C_IN, SIZE, SIZE])],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def macs(width: int) -> int:
    """Multiply-accumulates of one sample through both convs."""
    return 2 * SIZE * SIZE * 9 * C_IN * width


def run_range(workdir: Path, baseline: int, widths: range, batches: tuple[int, ...], args: argparse.Namespace) -> list:
    """Each width against the baseline width in its own interleaved A B A B measurement (pairs stay close in time)."""
    base = str(conv_pair(workdir / f"w{baseline}.onnx", baseline))
    rows = []
    for width in widths:
        path = base if width == baseline else str(conv_pair(workdir / f"w{width}.onnx", width))
        report = measure([base, path] if path != base else [base], "ort-cpu", batches, warmup_s=args.warmup,
                         min_duration_s=args.duration, min_iters=args.iterations, rounds=args.rounds,
                         threads=args.threads, round_to=0)
        for batch in batches:
            stats = report.result(path, batch).latency
            comparison = next((c for c in report.comparisons if c.batch == batch), None)
            ratio = comparison.ratio if comparison else 1.0
            rows.append({"width": width, "batch": batch, "median_ms": stats.median_s * 1e3,
                         "p90_ms": stats.p90_s * 1e3, "cv": stats.cv, "ratio_vs_baseline": ratio,
                         "round_ratios": list(comparison.ratios) if comparison else [1.0],
                         "macs_ratio": macs(width) / macs(baseline),
                         "efficiency": (macs(width) / macs(baseline)) / ratio})
    return sorted(rows, key=lambda r: (r["batch"], r["width"]))


def summarise(rows: list[dict]) -> dict[str, float]:
    """Mean efficiency of widths divisible by k versus not, for k in 2, 4, 8, 16."""
    out = {}
    eff = np.array([r["efficiency"] for r in rows])
    widths = np.array([r["width"] for r in rows])
    for k in (2, 4, 8, 16):
        on = widths % k == 0
        out[f"mult{k}_efficiency"] = float(eff[on].mean())
        out[f"not_mult{k}_efficiency"] = float(eff[~on].mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short timings (smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    args.warmup, args.duration, args.iterations = (0.05, 0.1, 7) if args.quick else (0.2, 0.5, 14)
    batches = (1, 8)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (baseline, widths) in RANGES.items():
            rows = run_range(Path(tmp), baseline, widths, batches, args)
            results[name] = {"baseline": baseline, "rows": rows,
                             "summary": {f"batch{b}": summarise([r for r in rows if r["batch"] == b])
                                         for b in batches}}
    payload = {"format": "diprune.round_to/1", "model": f"conv3x3({C_IN}->w)-relu-conv3x3(w->{C_IN}) at "
               f"{SIZE}x{SIZE}", "backend": "ort-cpu", "threads": args.threads, "quick": args.quick,
               "machine": machine_info(), "results": results}
    atomic_write_bytes(RESULT, json.dumps(payload, indent=1).encode())
    print(f"{'range':<11} {'batch':>5} {'width':>5} {'median ms':>10} {'ratio':>7} {'MACs':>6} {'eff':>6}")
    for name, block in results.items():
        for r in block["rows"]:
            print(f"{name:<11} {r['batch']:>5} {r['width']:>5} {r['median_ms']:>10.3f} {r['ratio_vs_baseline']:>7.3f} "
                  f"{r['macs_ratio']:>6.3f} {r['efficiency']:>6.3f}")
        for key, summary in block["summary"].items():
            print(name, key, " ".join(f"{k}={v:.3f}" for k, v in summary.items()))
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()

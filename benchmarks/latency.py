"""Realized onnxruntime CPU speedup of magnitude-pruned torchvision models versus their MACs reduction.

For each architecture (random seeded weights; no pretrained weights exist on these machines): export to ONNX
(``pipeline.model.export``), prune to 50 % and 25 % of the MACs with the data-free ``l2`` scorer and round-to 8
(analyse, ``SCORERS["l2"]``, ``select_channels``, ``apply_plan``), then time original and pruned
models in interleaved rounds (``pipeline.deployment.bench.measure``) at batch 1 and 32. ``speedup`` is the median over rounds
of original/pruned latency; ``macs_speedup`` = original MACs / pruned MACs; ``efficiency`` = speedup / macs_speedup
(1.0: latency fell as much as the MACs did).

Run: ``python benchmarks/latency.py [--quick] [--models resnet50,...] [--batches 1,32] [--threads N]``; writes
``benchmarks/results/latency.json`` and ``latency.md`` (the printed markdown table). Exports and pruned models are
cached in ``--work``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks.output import torchvision_onnx, write_results
from graph_ops.cost import count
from graph_ops.io import load_model, save_model
from pipeline.deployment.bench import machine_info, measure

MODELS = ("resnet50", "mobilenet_v2", "vgg16", "efficientnet_b0")
TARGETS = (0.5, 0.25)
RESULT = Path(__file__).resolve().parent / "results" / "latency.json"


def pruned(original: Path, target: float, work: Path) -> Path:
    """Prune to ``target`` of the MACs with l2 magnitude scores and round-to 8 (cached).

    The stages are chained by ``pipeline.prune.orchestrate.PruneRun`` (prepare, ``l2`` scores, plan, apply).
    """
    from pipeline.prune.orchestrate import PruneRun

    path = work / f"{original.stem}.l2.{int(target * 100)}.onnx"
    if not path.is_file():
        run = PruneRun(original, None, progress=False)
        save_model(run.apply(run.plan(run.scores("l2"), target_macs=target, round_to=8)), path)
    return path


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    original = torchvision_onnx(name, args.work)
    variants = [pruned(original, t, args.work) for t in TARGETS]
    paths = [str(original), *map(str, variants)]
    macs = [count(load_model(p)).macs for p in paths]
    report = measure(paths, "ort-cpu", args.batches, warmup_s=args.warmup, min_duration_s=args.duration,
                     min_iters=args.rounds, rounds=args.rounds, threads=args.threads, round_to=8)
    rows = []
    for batch in args.batches:
        base = report.result(paths[0], batch).latency
        rows.append({"model": name, "variant": "original", "batch": batch, "macs": macs[0], "macs_speedup": 1.0,
                     "median_ms": base.median_s * 1e3, "cv": base.cv, "speedup": 1.0, "efficiency": 1.0})
        for target, path, m in zip(TARGETS, paths[1:], macs[1:], strict=True):
            stats = report.result(path, batch).latency
            comparison = next(c for c in report.comparisons if c.model == path and c.batch == batch)
            rows.append({"model": name, "variant": f"l2 {int(target * 100)}% MACs", "batch": batch, "macs": m,
                         "macs_speedup": macs[0] / m, "median_ms": stats.median_s * 1e3, "cv": stats.cv,
                         "speedup": comparison.speedup, "efficiency": comparison.speedup / (macs[0] / m)})
    return rows


def markdown(rows: list[dict]) -> str:
    """The result rows as a markdown table."""
    lines = ["| model | variant | batch | GMACs | MACs speedup | median ms | CV | speedup | efficiency |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['variant']} | {r['batch']} | {r['macs'] / 1e9:.2f} | {r['macs_speedup']:.2f} | "
              f"{r['median_ms']:.2f} | {r['cv']:.3f} | {r['speedup']:.2f} | {r['efficiency']:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 only, short timings")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: ORT's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("work/latency"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.batches = (1,) if args.quick else tuple(int(b) for b in args.batches.split(","))
    args.warmup, args.duration = (0.2, 0.5) if args.quick else (1.0, 3.0)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [row for name in args.models.split(",") for row in bench_model(name, args)]
    payload = {"format": "diprune.latency/1", "backend": "ort-cpu", "threads": args.threads, "quick": args.quick,
               "rounds": args.rounds, "machine": machine_info(), "rows": rows}
    print(write_results(RESULT, payload, lambda doc: markdown(doc["rows"]) + "\n"), end="")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()

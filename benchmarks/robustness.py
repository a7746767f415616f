"""Robustness of pruned models (issue 13, Tian et al. §4.3): the five MNIST families at a quarter of the MACs.

Protocol. Models: ``benchmarks/models/mnist_{vgg,resnet,mobilenet,inception,lenet}.onnx``. Each is pruned to 0.25 of
its MACs with the library's defaults (``PruneRun.candidate``: auto pooling, the planner with fill-back, ``lstsq``
recovery) by ``di`` and by ``l2`` (the data-free criterion: does a discriminant choice give up robustness?), calibrated
and recovered on the first 2,000 training digits. :func:`pipeline.evaluation.robustness.robustness` then measures the original
and the pruned model on the 2,000 held-out digits: clean, under Gaussian noise of 0.1 / 0.25 / 0.5 input standard
deviations, and under FGSM and 5-step PGD examples crafted on the *original* model (onnx2torch) at eps 0.05 / 0.1 /
0.2 input standard deviations: top-1 of both models and their agreement. onnxruntime on CPU, 1 thread.

Run from the repository root (about 10 minutes on 2 cores)::

    python -m benchmarks.robustness        # writes benchmarks/results/robustness.{json,md}
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from graph_ops.io import atomic_write_bytes
from pipeline.data.named import open_dataset
from pipeline.deployment.bench import machine_info
from pipeline.evaluation.robustness import EPSILONS, NOISE, PGD_STEPS, robustness
from pipeline.prune.orchestrate import PruneRun

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FAMILIES = ("vgg", "resnet", "mobilenet", "inception", "lenet")
METHODS = ("di", "l2")
TARGET = 0.25
N_CALIB = 2000
THREADS = 1

logger = logging.getLogger(__name__)


def measure_family(name: str, methods: Sequence[str], target: float, n_calib: int) -> dict[str, Any]:
    """Prune one family with each method and measure both models' robustness."""
    test = open_dataset("mnist", split="test")
    run = PruneRun(ROOT / f"benchmarks/models/mnist_{name}.onnx", open_dataset("mnist", split="train", limit=n_calib),
                   backend="ort-cpu", intra_op_threads=THREADS, progress=False)
    entry: dict[str, Any] = {}
    for method in methods:
        start = time.perf_counter()
        candidate = run.candidate(method, target_macs=target)
        fraction = run.cost(candidate.model).macs / run.prepared.cost.macs
        result = robustness(run.prepared.model, candidate.model, test, backend="ort-cpu", intra_op_threads=THREADS)
        entry[method] = {"macs_fraction": fraction, **result, "seconds": round(time.perf_counter() - start, 1)}
        logger.info("%s %s: MACs %.3f, clean %s", name, method, fraction, result["clean"])
    return entry


def _pair(cell: Mapping[str, float]) -> str:
    return f"{100 * cell['top1_original']:.1f} / {100 * cell['top1_pruned']:.1f} ({100 * cell['agreement']:.0f})"


def report_lines(doc: Mapping[str, Any]) -> list[str]:
    """The markdown table: per family and method, original / pruned top-1 (agreement %) per condition."""
    machine = doc["machine"]
    conditions = [("clean", None), *((f"noise {s}", ("noise", str(s))) for s in doc["noise"]),
                  *((f"FGSM {e}", ("fgsm", str(e))) for e in doc["epsilons"]),
                  *((f"PGD-{doc['pgd_steps']} {e}", ("pgd", str(e))) for e in doc["epsilons"])]
    lines = [f"# Robustness of pruned models ({machine.get('cpu', '?')}, {machine.get('cores_available', '?')} cores, "
             f"onnxruntime {machine.get('versions', {}).get('onnxruntime', '?')}, torch "
             f"{machine.get('versions', {}).get('torch', '?')})", "",
             f"Each family pruned to {doc['target']} of its MACs with the defaults (lstsq recovery, {doc['n_calib']} "
             "calibration digits); held-out digits, 2,000. Cells: top-1 % of the original / the pruned model "
             "(agreement %). Noise strength and attack eps in input standard deviations; attacks crafted on the "
             "original model and transferred to the pruned one (`python -m benchmarks.robustness`).", "",
             "| family | method | MACs | " + " | ".join(c for c, _ in conditions) + " |",
             "|---|---|---|" + "---|" * len(conditions)]
    for name, entry in doc["models"].items():
        for method, cell in entry.items():
            cells = [_pair(cell["clean"] if key is None else cell[key[0]][key[1]]) if key is None or key[1] in
                     cell.get(key[0], {}) else "not done" for _, key in conditions]
            lines.append(f"| {name} | {method} | {cell['macs_fraction']:.3f} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--target", type=float, default=TARGET)
    parser.add_argument("--n-calib", type=int, default=N_CALIB)
    parser.add_argument("--out", type=Path, default=RESULTS / "robustness.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    doc = {"machine": machine_info(), "target": args.target, "n_calib": args.n_calib, "noise": list(NOISE),
           "epsilons": list(EPSILONS), "pgd_steps": PGD_STEPS, "threads": THREADS,
           "command": " ".join(["python -m benchmarks.robustness", *(sys.argv[1:] if argv is None else argv)]),
           "models": {name: measure_family(name, args.methods, args.target, args.n_calib) for name in args.models}}
    atomic_write_bytes(args.out, json.dumps(doc, indent=1, sort_keys=True).encode())
    atomic_write_bytes(args.out.with_suffix(".md"), "\n".join(report_lines(doc)).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

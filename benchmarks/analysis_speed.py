"""Speed of the graph side on resnet50 (legacy export): canonicalize, analyze, apply_plan (median of 3).

Usage::

    .venv/bin/python -m benchmarks.analysis_speed [--cache work/zoo] [--repeats 3]

The model is exported once into ``--cache`` (``tests.models.export_zoo``: 10 classes, 1x3x64x64 input; the graph
and weights are the full resnet50 apart from the head). ``canonicalize`` is timed on the canonical model itself
(a second run finds nothing to rewrite but still walks, folds and verifies the whole graph); ``apply_plan`` keeps a
seeded random 50 % of every prunable group and includes the full ONNX checker. Writes
``benchmarks/results/analysis_speed.json`` with machine information. Target: each step well under 5 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from graph_ops.canonicalize import canonicalize
from graph_ops.channels import analyze
from graph_ops.io import load_model
from graph_ops.prune import apply_plan
from tests.models import export_zoo
from tests.oracles import random_valid_plan

RESULTS = Path(__file__).resolve().parent / "results" / "analysis_speed.json"
TARGET_S = 5.0


def median_seconds(step: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` runs of ``step``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Time the three steps and write the JSON result."""
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("work/zoo"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    model = load_model(export_zoo("resnet50", "legacy", args.cache))
    index = analyze(model)
    plan = random_valid_plan(index, np.random.default_rng(0), low=0.5, high=0.5)
    seconds = {
        "canonicalize": median_seconds(lambda: canonicalize(model), args.repeats),
        "analyze": median_seconds(lambda: analyze(model), args.repeats),
        "apply_plan": median_seconds(lambda: apply_plan(model, index, plan), args.repeats),
    }
    result = {
        "model": "resnet50-legacy (1x3x64x64, 10 classes)", "nodes": len(model.graph.node),
        "groups": len(index.groups), "repeats": args.repeats, "median_s": {k: round(v, 3) for k, v in seconds.items()},
        "target_s": TARGET_S, "within_target": all(v < TARGET_S for v in seconds.values()),
        "machine": {"python": platform.python_version(), "machine": platform.machine(),
                    "processor": platform.processor(), "cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for step, value in seconds.items():
        print(f"{step:13s} {value:7.3f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""DI scoring time for one 2048-channel group: exact drops, then the full greedy elimination (median of 3).

Usage::

    .venv/bin/python benchmarks/di_speed.py [--channels 2048] [--repeats 3]

Statistics are synthetic but consistent (within scatter ``n(I + B Bᵀ/r)`` with a rank-64 ``B``, class means
spread around a global mean, ``n = 50 000``), built directly (no samples), for ``K = 10`` and ``K = 1000``.
``drops`` = Cholesky + inverse of ``S + ρI``, ``Q = M D``, ``G = Q Qᵀ`` and all per-channel drops;
``greedy`` = the whole backward elimination with lazy rank-1 downdates (order + retention curve for every width).
Writes ``benchmarks/results/di_speed.json`` with machine information. Target: a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from pipeline.calibration.stats import ProbeStats
from pipeline.selection.scorers.di import Eliminator, eliminate

RESULTS = Path(__file__).resolve().parent / "results" / "di_speed.json"


def synthetic_stats(channels: int, classes: int, seed: int = 0, n: int = 50_000) -> ProbeStats:
    """Consistent sufficient statistics of ``n`` samples without drawing them."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(classes, 1.0 / classes))
    mu = rng.normal(size=channels)
    offsets = 0.3 * rng.normal(size=(classes, channels))
    offsets -= (counts @ offsets / n)[None, :]  # class means average to mu
    basis = rng.normal(size=(channels, 64))
    within = n * (np.eye(channels) + basis @ basis.T / 64)
    deltas = offsets * np.sqrt(counts)[:, None]
    gram = within + deltas.T @ deltas + n * np.outer(mu, mu)
    class_sums = counts[:, None] * (mu[None, :] + offsets)
    return ProbeStats(n=n, class_counts=counts, sum=class_sums.sum(axis=0), class_sums=class_sums, gram=gram,
                      zeros=np.zeros(channels), abs_sum=np.zeros(channels), elements=n, cells=1)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_one(stats: ProbeStats) -> tuple[float, float]:
    """Seconds for (drops, greedy elimination) on fresh state."""
    blocks = np.arange(stats.dim)[:, None]
    start = time.perf_counter()
    eliminator = Eliminator(stats, blocks)
    eliminator.drops()
    middle = time.perf_counter()
    eliminate([eliminator])
    return middle - start, time.perf_counter() - middle


def main() -> None:
    """Run the timings, print them and write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = {}
    for classes in (10, 1000):
        stats = synthetic_stats(args.channels, classes)
        times = [time_one(stats) for _ in range(args.repeats)]
        drops, greedy = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
        runs[f"K={classes}"] = {"drops_s": round(drops, 3), "greedy_s": round(greedy, 3),
                                "total_s": round(drops + greedy, 3), "all_runs_s": [[round(a, 3), round(b, 3)]
                                                                                   for a, b in times]}
        print(f"channels={args.channels} K={classes}: drops {drops:.2f} s, greedy elimination {greedy:.2f} s "
              f"(median of {args.repeats})")
    result = {"benchmark": "di_speed", "channels": args.channels, "repeats": args.repeats, "results": runs,
              "machine": {"platform": platform.platform(), "cpu_model": _cpu_model(), "cores": os.cpu_count(),
                          "numpy": np.__version__, "python": platform.python_version(),
                          "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
                          "load_average_at_end": os.getloadavg()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

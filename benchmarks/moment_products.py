"""Issue 30: the time of one batch's recovery moments, float64 products of float64 copies (the code before) against
float32 products of mean-shifted rows (``graph_ops.least_squares.accumulate`` now), at ResNet-18-like layer sizes.

Rows: ``R = 64 images x 64 sampled positions = 4096`` float32 rows of ``d = C x 3 x 3 + 1`` post-ReLU-like values
(a 3x3 Conv's patches at half of ResNet-18's widths C = 32, 64, 128, 256) against ``2 C`` targets; each variant runs
``--repeats`` times (best time kept), with OpenBLAS on the threads the process has. Run from the repository root:
``python -m benchmarks.moment_products`` (about a minute); writes ``benchmarks/results/moment_products.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.output import write_results
from graph_ops.least_squares import LayerShape, PatchMoments, accumulate, patch_rows

RESULT = Path(__file__).resolve().parent / "results" / "moment_products.json"


def float64_moments(rows: np.ndarray, targets: np.ndarray) -> PatchMoments:
    """The one-group path of ``accumulate`` before issue 30: float64 copies, float64 products."""
    x = np.asarray(rows[:, 0], np.float64)
    y = np.asarray(targets[:, 0], np.float64)
    return PatchMoments(len(rows), (x.T @ x)[None], (x.T @ y)[None], (y**2).sum(axis=0)[None])


def _best(fn: Any, rows: np.ndarray, targets: np.ndarray, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(rows, targets)
        times.append(time.perf_counter() - start)
    return min(times)


def measure(repeats: int) -> dict[str, Any]:
    """Best seconds of each variant per width, and the largest relative Gram difference between them."""
    rng = np.random.default_rng(0)
    rows_out = []
    for channels in (32, 64, 128, 256):
        x = np.maximum(rng.standard_normal((4096, channels * 9)) + 0.3, 0).astype(np.float32)
        rows = patch_rows(x[:, None], LayerShape("Conv"))
        targets = rng.standard_normal((4096, 1, 2 * channels)).astype(np.float32)
        old = _best(float64_moments, rows, targets, repeats)
        new = _best(accumulate, rows, targets, repeats)
        a, b = float64_moments(rows, targets).gram, accumulate(rows, targets).gram
        rows_out.append({"d": rows.shape[2], "outputs": 2 * channels, "float64_s": round(old, 4),
                         "float32_s": round(new, 4), "speedup": round(old / new, 2),
                         "max_rel_gram_diff": float(np.abs(a - b).max() / np.abs(a).max())})
    return {"rows": 4096, "repeats": repeats, "layers": rows_out, "loadavg": [round(v, 2) for v in os.getloadavg()],
            "cores": os.cpu_count()}


def markdown(doc: dict[str, Any]) -> str:
    """The results table."""
    lines = [f"# One batch's recovery moments: float64 vs float32 products ({doc['rows']} rows, best of "
             f"{doc['repeats']}; {doc['cores']} cores, load average {doc['loadavg'][0]}, machine shared)", "",
             "| d | outputs | float64 s | float32 s | speed-up | max rel. Gram diff |", "|---|---|---|---|---|---|"]
    lines += [f"| {row['d']} | {row['outputs']} | {row['float64_s']:.4f} | {row['float32_s']:.4f} | "
              f"{row['speedup']:.2f}x | {row['max_rel_gram_diff']:.1e} |" for row in doc["layers"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(write_results(RESULT, measure(args.repeats), markdown))


if __name__ == "__main__":
    main()

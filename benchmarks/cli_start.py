"""Start-up cost of the ``diprune`` command line: wall time of short commands and of ``import pipeline.cli``.

Protocol. Each command runs ``--runs`` times (default 5) as a fresh process, sequentially, and the median wall time
(``time.perf_counter`` around ``subprocess.run``, process start and exit included) is recorded, with the min and max:
``diprune --help``, ``diprune inspect DEMO`` (the shipped demo model, ``pipeline.prune.demo.demo_model_path``) and
``python -c "import pipeline.cli"``. The heavy third-party modules that ``import pipeline.cli`` loads are listed
(``sys.modules`` of a fresh interpreter), and ``python -X importtime``'s cumulative time of ``pipeline.cli`` is
recorded (median of the runs). The machine's load average is recorded before and after: on a shared machine the
absolute times are inflated by whatever else runs, so compare runs taken under similar load.

Run from the repository root: ``python -m benchmarks.cli_start [--runs 5] [--out benchmarks/results/cli_start.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.output import write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HEAVY = ("numpy", "onnx", "ml_dtypes", "onnxruntime", "onnx_graphsurgeon", "torch", "scipy")
_DIPRUNE = Path(sys.executable).with_name("diprune")


def _wall(command: list[str], runs: int) -> dict[str, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3)}


def _import_time(runs: int) -> float:
    """Median cumulative microseconds of ``pipeline.cli`` reported by ``-X importtime``, in seconds."""
    values = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import pipeline.cli"], check=True,
                              capture_output=True, text=True, cwd=ROOT)
        line = next(ln for ln in done.stderr.splitlines() if ln.rstrip().endswith("| pipeline.cli"))
        values.append(int(line.split("|")[1]) / 1e6)
    return round(statistics.median(values), 3)


def _heavy_modules() -> list[str]:
    code = f"import sys, pipeline.cli; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return done.stdout.split()


def measure(runs: int) -> dict[str, Any]:
    """Every measurement of the protocol."""
    from pipeline.prune.demo import demo_model_path

    demo = str(demo_model_path())
    load_before = os.getloadavg()
    walls = {"diprune --help": _wall([str(_DIPRUNE), "--help"], runs),
             "diprune inspect DEMO": _wall([str(_DIPRUNE), "inspect", demo], runs),
             "python -c 'import pipeline.cli'": _wall([sys.executable, "-c", "import pipeline.cli"], runs)}
    return {"runs": runs, "wall": walls, "importtime_pipeline_cli_s": _import_time(runs),
            "heavy_modules_imported_by_cli": _heavy_modules(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "cores": os.cpu_count()}


def markdown(doc: dict[str, Any]) -> str:
    """The results table."""
    lines = [f"# CLI start-up ({doc['cores']} cores, load average {doc['loadavg_before'][0]} before, "
             f"{doc['loadavg_after'][0]} after; machine shared)", "",
             f"Median wall time of {doc['runs']} fresh processes (min-max).", "",
             "| command | median s | min-max s |", "|---|---|---|"]
    for name, row in doc["wall"].items():
        lines.append(f"| `{name}` | {row['median_s']:.3f} | {row['min_s']:.3f}-{row['max_s']:.3f} |")
    lines += ["", f"`python -X importtime`: pipeline.cli cumulative {doc['importtime_pipeline_cli_s']:.3f} s; heavy "
              f"modules loaded by `import pipeline.cli`: {', '.join(doc['heavy_modules_imported_by_cli']) or 'none'}.",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "cli_start.json")
    args = parser.parse_args(argv)
    doc = measure(args.runs)
    print(json.dumps(doc))
    print(write_results(args.out, doc, markdown))


if __name__ == "__main__":
    main()

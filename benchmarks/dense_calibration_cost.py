"""What location-aware calibration costs: time against one plain onnxruntime pass over the same images, peak memory
against today's (pooled) calibration, on the production PP-OCR models shipped in rapidocr-onnxruntime.

Usage::

    .venv/bin/python -m benchmarks.dense_calibration_cost [--rounds 2] [--lines 256] [--pages 48]

Cases (data from :mod:`benchmarks.ocr_lines`, unlabelled unless said):

* ``rec-model``: the CTC recognizer at ``x:16x3x48x320`` on ``--lines`` rendered lines, ``--labels model`` (the
  best path per time step; probe views are height means; the output is fetched in the same run).
* ``det-model``: the DBNet text detector at ``x:8x3x320x320`` on ``--pages`` rendered pages, ``--labels model``
  (its probability map binarised at 0.5; whole probe views fetched).
* ``det-masks``: the same detector and pages with the detector's own binarised maps stored as ``y`` masks, i.e.
  data labels known before each batch runs: the sampled positions are gathered inside the graph.

Modes, each in a fresh process, in interleaved rounds
(plain, pooled, dense, then again): ``plain`` = one onnxruntime pass of the prepared model over the data (same
batches, :func:`pipeline.model.runtime.open_session`), ``pooled`` = today's calibration of every probe (pooled features,
no labels: what ``l2``/``mean-act`` use and what DI used on a classifier), ``dense`` = the location-aware calibration.
Memory: the peak resident memory of the process during the mode's work alone (``VmHWM`` after resetting it through
``/proc/self/clear_refs`` once the model is prepared and the data opened; the preparation's own peak is excluded).
Reported per case: the best time of each mode over the rounds and the ratios ``dense / plain`` (time) and ``dense /
pooled`` (peak memory). Writes ``benchmarks/results/dense_calibration_cost.json`` and ``.md`` with the machine. The
machine was shared with other jobs: only ratios measured within one run mean anything.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.ocr_lines import DETECTOR, MODEL, dictionary, render, render_pages
from benchmarks.output import write_results

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {"rec-model": (MODEL, "x:16x3x48x320", "lines.npz", "model"),
         "det-model": (DETECTOR, "x:8x3x320x320", "pages.npz", "model"),
         "det-masks": (DETECTOR, "x:8x3x320x320", "pages_masks.npz", "data")}
MODES = ("plain", "pooled", "dense")


def _data(work: Path, lines: int, pages: int) -> None:
    """The three data files (seeded; made once)."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "lines.npz").is_file():
        np.savez(work / "lines.npz", x=render(lines, 11, dictionary())[0])
    if not (work / "pages_masks.npz").is_file():
        x = render_pages(pages, 12, dictionary())
        np.savez(work / "pages.npz", x=x)
        from pipeline.data.outputs import map_classes
        from pipeline.model.prepare import prepare
        from pipeline.model.runtime import open_session

        prepared = prepare(DETECTOR, {"x": (8, 3, 320, 320)})
        session = open_session(prepared.model.SerializeToString(), "ort-cpu")
        maps = np.concatenate([map_classes(session.run(None, {"x": x[i:i + 8]})[0]) for i in range(0, len(x), 8)])
        np.savez(work / "pages_masks.npz", x=x, y=maps.astype(np.uint8))


def _child(case: str, mode: str, work: Path) -> dict[str, float]:
    """One measurement in this (fresh) process."""
    from pipeline.calibration.calibrate import calibrate
    from pipeline.data.datasets import from_npz
    from pipeline.data.targets import LabelOptions
    from pipeline.model.prepare import parse_input_shapes, prepare
    from pipeline.model.runtime import open_session

    path, shape, file, labels = CASES[case]
    prepared = prepare(path, parse_input_shapes([shape]))
    data = from_npz(work / (file if mode == "dense" else file.replace("_masks", "")))  # the same images, unlabelled
    batch = int(shape.split(":")[1].split("x")[0])
    before = _reset_peak()
    start = time.perf_counter()
    if mode == "plain":
        session = open_session(prepared.model.SerializeToString(), "ort-cpu")
        for feeds, _ in data.bind(["x"]).batches(batch):
            session.run(None, feeds)
        samples = data.num_samples
    else:
        dense = mode == "dense"
        stats = calibrate(prepared, data, progress=False, backend="ort-cpu", summaries=False, require_labels=dense,
                          labels=LabelOptions(source=labels) if dense else LabelOptions())
        samples = next(iter(stats.probes.values())).n
        assert (stats.targets is not None) == dense, stats.targets
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": _peak() / 1024, "rss_before_mb": before / 1024,
            "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "samples": samples}


def _status(key: str) -> int:
    """A ``/proc/self/status`` entry in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> int:
    """Reset the process's peak resident memory (Linux ``clear_refs`` 5), so that it measures the stage that follows
    (not the model preparation before it); returns the resident memory now, KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _peak() -> int:
    return _status("VmHWM")


def main() -> None:
    """Run the benchmark (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lines", type=int, default=256)
    parser.add_argument("--pages", type=int, default=48)
    parser.add_argument("--work", default="work/dense_cost")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.child:
        print(json.dumps(_child(*args.child, work)))
        return
    _data(work, args.lines, args.pages)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    for rnd in range(args.rounds):
        for case in args.cases.split(","):
            for mode in MODES:
                out = subprocess.run([sys.executable, "-m", "benchmarks.dense_calibration_cost", "--work", str(work),
                                      "--child", case, mode], check=True, capture_output=True, text=True)
                record = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault(case, {}).setdefault(mode, []).append(record)
                print(f"round {rnd} {case} {mode}: {record}", flush=True)
    from pipeline.deployment.bench import machine_info

    summary = {}
    for case, modes in runs.items():
        best = {mode: min(r["seconds"] for r in records) for mode, records in modes.items()}
        peak = {mode: max(r["peak_rss_mb"] for r in records) for mode, records in modes.items()}
        summary[case] = {"seconds": best, "peak_rss_mb": peak, "time_dense_over_plain": best["dense"] / best["plain"],
                         "memory_dense_over_pooled": peak["dense"] / peak["pooled"],
                         "time_pooled_over_plain": best["pooled"] / best["plain"],
                         "locations_first_probe": modes["dense"][0]["samples"]}
    doc = {"machine": machine_info(), "conditions": "2-core VM shared with other jobs; each mode in a fresh process, "
           "rounds interleaved; best time over the rounds", "lines": args.lines, "pages": args.pages,
           "summary": summary, "runs": runs}

    def markdown(d: dict) -> str:
        rows = ["# Location-aware calibration: cost", "", "`python -m benchmarks.dense_calibration_cost` (module "
                "docstring); 2-core VM shared with other jobs, best of the interleaved rounds.", "",
                "| case | plain pass (s) | pooled calibration (s) | dense calibration (s) | dense / plain time | "
                "peak MB pooled | peak MB dense | dense / pooled memory |", "|---|---|---|---|---|---|---|---|"]
        for case, s in d["summary"].items():
            rows.append(f"| {case} | {s['seconds']['plain']:.1f} | {s['seconds']['pooled']:.1f} | "
                        f"{s['seconds']['dense']:.1f} | {s['time_dense_over_plain']:.2f} | "
                        f"{s['peak_rss_mb']['pooled']:.0f} | {s['peak_rss_mb']['dense']:.0f} | "
                        f"{s['memory_dense_over_pooled']:.2f} |")
        return "\n".join(rows) + "\n"

    print(write_results(RESULTS / "dense_calibration_cost.json", doc, markdown))


if __name__ == "__main__":
    main()

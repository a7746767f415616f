"""Cost of one prune run at production scale: wall time and peak memory of every stage, as ratios to plain inference.

Protocol. torchvision ResNet-50 and ResNet-18 at 224x224 (seeded random weights with randomised BatchNorm
statistics, ``pipeline.model.export.load_torchvision``; no pretrained weights can be downloaded here), exported once with
``pipeline.model.export.export_torch`` and cached in ``--work``. Data: ``--images`` (default 256) seeded standard-normal
images with labels cycling through 10 classes (what an ImageNet-normalised calibration set looks like to the
statistics; the content does not change the cost). The job is ``diprune prune --method di --target-macs 0.5
--recover lstsq`` at batch 64, run stage by stage through ``pipeline.prune.orchestrate.PruneRun`` (the code path of
``prune``, in a process set up as the CLI sets up its own: no huge-page advice for numpy's arrays,
``pipeline.memory.no_huge_page_advice``): analyse (load, canonicalize, analyse), calibrate, score, plan, apply,
recover, write (model, plan, report).
Plain inference = an onnxruntime session with its default options over the same images at the same batch size and
threads (session creation included). Every model runs in its own child process, plain inference first then the prune, so peak memory is the
child's own: the peak resident set size (``VmRSS`` sampled every 10 ms) during each stage, and the process's
``ru_maxrss`` at the end; the prune's peak is the largest of its stages' (the plain inferences before and after are
references, not stages of the prune: their own peaks are reported beside it). The calibration and recovery options
are the CLI defaults. The load average before and after the run is recorded (the machine may be shared).

The recovery report's sweep timings (onnxruntime per model, folding into moments, spill writes, solves) are
recorded, and the recovered model's own plain inference is timed after the run, to give the *work floor*: every
stage but recovery as measured, plus one plain inference of each model and the moment arithmetic and solves of
recovery, i.e. the cost with no frontier, slicing or spill overhead.

Run from the repository root: ``python -m benchmarks.pipeline_cost [--models resnet50 resnet18] [--images 256]``
(about 10 minutes on 2 cores); writes ``benchmarks/results/pipeline_cost.json`` and ``pipeline_cost.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.output import torchvision_onnx, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GOALS = {"calibrate": 1.3, "total": 6.0, "peak_gib_resnet50": 2.0}  # issue 9; issue 30 keeps total 6x and 2 GiB
STAGES = ("analyze", "calibrate", "score", "plan", "apply", "recover", "write")


def _rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak resident set size per stage, sampled every 10 ms by a daemon thread."""

    def __init__(self) -> None:
        self.current = 0
        self.peaks: dict[str, float] = {}
        self._stop = False
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop:
            self.current = max(self.current, _rss())
            time.sleep(0.01)

    @contextmanager
    def stage(self, name: str, seconds: dict[str, float]) -> Iterator[None]:
        """Time the block and record its peak RSS in GiB."""
        self.current = _rss()
        start = time.perf_counter()
        yield
        seconds[name] = round(time.perf_counter() - start, 3)
        self.peaks[name] = round(max(self.current, _rss()) / 2**30, 3)


def dataset(images: int, batch: int) -> Any:
    """Seeded standard-normal images, labels cycling through 10 classes."""
    from pipeline.data.datasets import from_iterable

    x = np.random.default_rng(0).standard_normal((images, 3, 224, 224)).astype(np.float32)
    y = (np.arange(images) % 10).astype(np.int64)
    return from_iterable([(x[i:i + batch], y[i:i + batch]) for i in range(0, images, batch)],
                         name=f"gaussian {images}x3x224x224")


def _plain_inference(model: Any, data: Any, batch: int) -> None:
    """One onnxruntime session with its default options over every batch of ``data`` (session creation included)."""
    from pipeline.model.runtime import feed_batches, make_session, model_input_specs

    session, _ = make_session(model.SerializeToString(), "ort-cpu")
    for feeds, _ in feed_batches(data, model_input_specs(model), batch):
        session.run(None, feeds)


def child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One model in this process: plain inference, then the prune stage by stage."""
    from pipeline.memory import no_huge_page_advice
    from pipeline.prune.one_shot import write_candidate
    from pipeline.prune.orchestrate import PruneRun

    no_huge_page_advice()  # as the CLI's process does

    path = torchvision_onnx(name, args.work)
    data = dataset(args.images, args.batch)
    memory, seconds = PeakMemory(), {}
    with memory.stage("plain", seconds):
        from graph_ops.io import load_model

        _plain_inference(load_model(path), data, args.batch)
    with memory.stage("analyze", seconds):
        run = PruneRun(path, data, batch_size=args.batch, backend="ort-cpu", progress=False, work_dir=args.work)
    with memory.stage("calibrate", seconds):
        run.stats()
    with memory.stage("score", seconds):
        scores = run.scores("di")
    with memory.stage("plan", seconds):
        plan = run.plan(scores, target_macs=0.5)
    with memory.stage("apply", seconds):
        pruned = run.apply(plan)
    with memory.stage("recover", seconds):
        model, recovery = run.recover(pruned, plan, "lstsq")
    with memory.stage("write", seconds):
        from pipeline.prune.orchestrate import Candidate

        candidate = Candidate("di", plan, model, recovery, {"target_macs": 0.5})
        report = write_candidate(run, candidate, args.work / f"{name}.di.50.onnx")
    with memory.stage("plain_pruned", seconds):  # the pruned model's own inference (not a stage of the prune)
        _plain_inference(model, data, args.batch)
    total = sum(seconds[s] for s in STAGES)
    plain = seconds["plain"]
    sweep = recovery["sweep"]
    # the work the prune cannot skip at these settings: every stage but recovery as measured, and in recovery one
    # plain inference of each model plus the moment arithmetic and the solves (no frontier, slicing or spill)
    floor = (total - seconds["recover"] + plain + seconds["plain_pruned"] + sweep["seconds"]["fold"]
             + sweep["solve_s"])
    return {
        "model": name, "images": args.images, "batch": args.batch, "seconds": seconds,
        "recovery_sweep": {"seconds": sweep["seconds"], "solve_s": sweep["solve_s"],
                           "spill_bytes": sweep["spill_bytes"], "levels": sweep["levels"]},
        "work_floor_s": round(floor, 2),
        "ratio_to_plain": {**{s: round(seconds[s] / plain, 3) for s in STAGES}, "total": round(total / plain, 3),
                           "work_floor": round(floor / plain, 3)},
        "peak_rss_gib": memory.peaks, "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "macs_fraction": round(report.macs_fraction, 4), "params_fraction": round(report.params_fraction, 4),
        "recovered_layers": len(recovery.get("consumers", [])), "skipped_layers": len(recovery.get("skipped", [])),
    }


def _peak(row: dict[str, Any]) -> float:
    """The peak resident memory of the prune's stages (the reference inferences, of the original before the prune and
    of the pruned model after it, are not stages of the prune; their peaks are listed beside it)."""
    return max(row["peak_rss_gib"][s] for s in STAGES)


def markdown(doc: dict[str, Any]) -> str:
    """The results table."""
    machine = doc["machine"]
    lines = [f"# Pipeline cost ({machine['cpu']}, {machine['cores_available']} cores, onnxruntime "
             f"{machine['versions'].get('onnxruntime')})", "",
             f"`prune --method di --target-macs 0.5 --recover lstsq`, {doc['images']} images, batch {doc['batch']}. "
             "Seconds per stage, with the ratio to plain onnxruntime inference of the original model over the same "
             "images in the same process; peak resident memory of the prune's stages (GiB; in brackets, the plain "
             "inference's own peak: onnxruntime's default session, not a stage of the prune)."
             + (f" Load average {doc['loadavg_before'][0]} before, {doc['loadavg_after'][0]} after (the machine was "
                "shared: compare ratios, not seconds)." if "loadavg_before" in doc else ""), "",
             "| model | plain s | " + " | ".join(STAGES) + " | total | peak GiB (plain) |",
             "|---|---" + "|---" * (len(STAGES) + 2) + "|"]
    for row in doc["models"]:
        cells = [f"{row['seconds'][s]:.1f} ({row['ratio_to_plain'][s]:.2f}x)" for s in STAGES]
        total = sum(row["seconds"][s] for s in STAGES)
        lines.append(f"| {row['model']} | {row['seconds']['plain']:.1f} | " + " | ".join(cells)
                     + f" | {total:.1f} ({row['ratio_to_plain']['total']:.2f}x) | {_peak(row):.2f} "
                     f"({row['peak_rss_gib']['plain']:.2f}) |")
    lines += ["", "Where recovery's time went (seconds; onnxruntime per model inside the sweep beside the model's "
              "plain inference over the same images; fold: building design rows and float64 moments; solve: the "
              "driver's merges and solves; spill: writing the frontier's file, with its largest size). Work floor: "
              "every stage but recovery as measured, plus in recovery one plain inference of each model, the fold "
              "and the solves: what the run costs with no frontier, slicing or spill overhead.", "",
              "| model | recover | onnxruntime original (plain) | onnxruntime pruned (plain) | fold | solve | "
              "spill write (GB) | rest | work floor |", "|---|---|---|---|---|---|---|---|---|"]
    for row in doc["models"]:
        sweep, sec = row.get("recovery_sweep"), row["seconds"]
        if not sweep:
            continue
        took = sweep["seconds"]
        rest = sec["recover"] - sum(took.values()) - sweep["solve_s"]
        lines.append(f"| {row['model']} | {sec['recover']:.1f} | {took['onnxruntime_original']:.1f} ({sec['plain']:.1f}) | "
                     f"{took['onnxruntime_current']:.1f} ({sec['plain_pruned']:.1f}) | {took['fold']:.1f} | "
                     f"{sweep['solve_s']:.1f} | {took['spill_write']:.1f} ({sweep['spill_bytes'] / 1e9:.2f}) | "
                     f"{rest:.1f} | {row['work_floor_s']:.1f} ({row['ratio_to_plain']['work_floor']:.2f}x) |")
    lines += ["", "Peak resident memory per stage (GiB): " + "; ".join(
        f"{row['model']}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["peak_rss_gib"].items())
        for row in doc["models"]),
        "", f"Goals (issue 9): calibrate <= {GOALS['calibrate']}x plain, total <= {GOALS['total']}x plain, peak <= "
        f"{GOALS['peak_gib_resnet50']} GiB for resnet50 at batch 64.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run every model in a child process and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet18"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "cost")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "pipeline_cost.json")
    parser.add_argument("--report", action="store_true", help="only write the markdown again from --out's JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.report:
        print(write_results(args.out, json.loads(args.out.read_text()), markdown))
        return
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    from pipeline.deployment.bench import machine_info

    rows, load = [], os.getloadavg()
    for name in args.models:
        command = [sys.executable, "-m", "benchmarks.pipeline_cost", "--child", name, "--images", str(args.images),
                   "--batch", str(args.batch), "--work", str(args.work)]
        done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    info = machine_info()
    doc = {"images": args.images, "batch": args.batch, "models": rows, "goals": GOALS, "machine": info,
           "loadavg_before": [round(v, 2) for v in load], "loadavg_after": [round(v, 2) for v in os.getloadavg()]}
    print(write_results(args.out, doc, markdown))


if __name__ == "__main__":
    main()


"""Issue 30's held-out cost check: a whole ``diprune prune`` process against one plain inference.

Protocol. torchvision ResNet-18 at 160x160 (seeded random weights with randomised BatchNorm statistics,
``pipeline.model.export.load_torchvision``; exported once with ``pipeline.model.export.export_torch`` to ``--work``), 128 seeded
standard-normal images with labels cycling through 10 classes, written once to an uncompressed ``.npz`` (``x``,
``y``). Plain inference = an onnxruntime session with its default options over the 128 images at batch 64, in this
process (session creation included; the model is read from its file). The prune is the command line as a user runs
it, a fresh process timed from ``subprocess.run`` to its exit (interpreter start-up and imports included):
``diprune prune MODEL --data cal.npz --method di --target-macs 0.5 --recover lstsq --batch-size 64 -o OUT``. Plain
inference and prune alternate ``--runs`` times (default 1); the ratio is prune / plain of each pair, and the child's
peak resident memory (``ru_maxrss`` of the children) is recorded. The load average before and after is recorded: on
a shared machine, compare ratios, not seconds.

Run from the repository root: ``python -m benchmarks.whole_process_cost [--runs 1]`` (about 2 minutes on 2 quiet
cores); writes ``benchmarks/results/whole_process_cost.json`` and ``whole_process_cost.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.output import write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GOAL = 8.0
SIZE, IMAGES, BATCH = 160, 128, 64
_DIPRUNE = Path(sys.executable).with_name("diprune")


def inputs(work: Path) -> tuple[Path, Path]:
    """The model at ``SIZE`` and the calibration ``.npz``, made once in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    model, data = work / f"resnet18_{SIZE}.onnx", work / f"gaussian_{IMAGES}x{SIZE}.npz"
    if not model.is_file():
        import torch

        from pipeline.model.export import export_torch, load_torchvision

        export_torch(load_torchvision("resnet18", seed=0), torch.randn(1, 3, SIZE, SIZE), model)
    if not data.is_file():
        x = np.random.default_rng(0).standard_normal((IMAGES, 3, SIZE, SIZE)).astype(np.float32)
        np.savez(data, x=x, y=(np.arange(IMAGES) % 10).astype(np.int64))
    return model, data


def plain_inference(model: Path, data: Path) -> float:
    """Seconds of one default onnxruntime session over the images (session creation included)."""
    import onnxruntime as ort

    x = np.load(data)["x"]
    start = time.perf_counter()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for i in range(0, len(x), BATCH):
        session.run(None, {name: x[i:i + BATCH]})
    return time.perf_counter() - start


def prune_process(model: Path, data: Path, out: Path) -> float:
    """Seconds of one ``diprune prune`` process, start to exit."""
    command = [str(_DIPRUNE), "prune", str(model), "--data", str(data), "--method", "di", "--target-macs", "0.5",
               "--recover", "lstsq", "--batch-size", str(BATCH), "-o", str(out)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def measure(runs: int, work: Path) -> dict[str, Any]:
    """Every measurement of the protocol."""
    model, data = inputs(work)
    load_before = os.getloadavg()
    pairs = []
    for _ in range(runs):
        plain = plain_inference(model, data)
        prune = prune_process(model, data, work / f"resnet18_{SIZE}.di.50.onnx")
        pairs.append({"plain_s": round(plain, 2), "prune_s": round(prune, 2), "ratio": round(prune / plain, 2)})
    return {"model": f"resnet18 {SIZE}x{SIZE}", "images": IMAGES, "batch": BATCH, "runs": pairs, "goal": GOAL,
            "prune_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3),
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()], "cores": os.cpu_count()}


def markdown(doc: dict[str, Any]) -> str:
    """The results table."""
    lines = [f"# Whole prune process vs plain inference ({doc['cores']} cores, load average "
             f"{doc['loadavg_before'][0]} before, {doc['loadavg_after'][0]} after; machine shared)", "",
             f"{doc['model']}, {doc['images']} images, batch {doc['batch']}: `diprune prune --method di "
             "--target-macs 0.5 --recover lstsq` as a fresh process (start-up included) against one plain "
             f"onnxruntime inference in the benchmark's process. Goal (issue 30): <= {doc['goal']:g}x.", "",
             "| run | plain s | prune process s | ratio |", "|---|---|---|---|"]
    for i, row in enumerate(doc["runs"], 1):
        lines.append(f"| {i} | {row['plain_s']:.1f} | {row['prune_s']:.1f} | {row['ratio']:.2f}x |")
    lines += ["", f"Peak resident memory of the prune process: {doc['prune_peak_rss_gib']:.2f} GiB.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "whole_process")
    parser.add_argument("--out", type=Path, default=RESULTS / "whole_process_cost.json")
    args = parser.parse_args(argv)
    doc = measure(args.runs, args.work)
    print(json.dumps(doc))
    print(write_results(args.out, doc, markdown))


if __name__ == "__main__":
    main()

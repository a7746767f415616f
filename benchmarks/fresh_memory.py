"""What fresh memory costs on this machine, and what the two remedies in the pipeline buy back.

Protocol (each part in its own child process, so one part's memory state does not carry into the next):

1. ``fill``: ``--rounds`` times, compute for ``--pause`` seconds (float64 matrix products), then allocate and fill one
   147 MB float32 array and free it; GB/s of the fills, with numpy's transparent-huge-page advice on and off
   (``pipeline.memory.set_huge_page_advice``; ``no_huge_page_advice`` turns it off in the CLI).
2. ``spill``: the same rhythm, writing the 147 MB array to disk under ``--work``, four alive at once: into a fresh
   file per write (deleted once four newer ones exist, as the recovery frontier did with one file per tensor) or into
   extents of one file (``pipeline.recovery.frontier.FrontierStore``: extents written again after their last
   reader); GB/s of the writes after the first four (which take fresh pages either way).
3. ``stages``: ``--pairs`` interleaved pairs of (calibrate, DI score) on torchvision ResNet-50 at 224x224 (random
   weights, ``benchmarks.pipeline_cost``'s model and 256 Gaussian images, batch 64) with the advice on and off.

Run from the repository root: ``python -m benchmarks.fresh_memory`` (about 7 minutes on 2 cores); writes
``benchmarks/results/fresh_memory.json`` and ``fresh_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.output import write_results
from pipeline.memory import set_huge_page_advice

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ARRAY_BYTES = 147 << 20
KEPT = 4  # arrays alive at once in the spill part (a frontier of four batches)


def _compute(seconds: float) -> None:
    start = time.perf_counter()
    x = np.ones((600, 600))
    while time.perf_counter() - start < seconds:
        x @ x


def fill(rounds: int, pause: float, advice: bool) -> float:
    """GB/s of allocating and filling a fresh 147 MB array after ``pause`` seconds of compute."""
    set_huge_page_advice(advice)
    spent = 0.0
    for _ in range(rounds):
        _compute(pause)
        start = time.perf_counter()
        array = np.empty(ARRAY_BYTES // 4, np.float32)
        array.fill(1.0)
        spent += time.perf_counter() - start
        del array
    return rounds * ARRAY_BYTES / 1e9 / spent


def spill(rounds: int, pause: float, reuse: bool, work: Path) -> float:
    """GB/s of writing a 147 MB array after ``pause`` seconds of compute: fresh files, or reused extents."""
    from pipeline.recovery.frontier import FrontierStore

    array = np.random.default_rng(0).standard_normal(ARRAY_BYTES // 4).astype(np.float32)
    spent, timed = 0.0, 0
    with tempfile.TemporaryDirectory(dir=work) as folder:
        store = FrontierStore(0, folder)
        for i in range(rounds):
            _compute(pause)
            start = time.perf_counter()
            if reuse:
                store.put("t", i, array)
            else:
                with open(Path(folder) / f"f{i}.bin", "wb") as handle:
                    array.tofile(handle)
            if i >= KEPT:  # steady state: the first KEPT writes of either way take fresh pages
                spent += time.perf_counter() - start
                timed += 1
            if reuse:
                if i >= KEPT - 1:
                    store.discard("t", i - KEPT + 1)
                store.release()
            elif i >= KEPT - 1:
                (Path(folder) / f"f{i - KEPT + 1}.bin").unlink()
        store.close()
    return timed * ARRAY_BYTES / 1e9 / spent


def stages(advice: bool, work: Path) -> dict[str, float]:
    """Seconds of calibration and DI scoring of ResNet-50 (``benchmarks.pipeline_cost``'s job)."""
    from benchmarks.output import torchvision_onnx
    from benchmarks.pipeline_cost import dataset
    from pipeline.prune.orchestrate import PruneRun

    set_huge_page_advice(advice)
    data = dataset(256, 64)
    run = PruneRun(torchvision_onnx("resnet50", work), data, batch_size=64, backend="ort-cpu", progress=False, work_dir=work)
    start = time.perf_counter()
    run.stats()
    calibrate = time.perf_counter() - start
    start = time.perf_counter()
    run.scores("di")
    return {"calibrate": round(calibrate, 2), "score": round(time.perf_counter() - start, 2)}


def _child(args: argparse.Namespace, part: str, option: str) -> Any:
    command = [sys.executable, "-m", "benchmarks.fresh_memory", "--child", part, "--option", option,
               "--rounds", str(args.rounds), "--pause", str(args.pause), "--work", str(args.work)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(doc: dict[str, Any]) -> str:
    """The results tables."""
    machine = doc["machine"]
    lines = [f"# Fresh memory ({machine['cpu']}, {machine['cores_available']} cores)", "",
             f"147 MB per round, {doc['rounds']} rounds, each after {doc['pause']} s of compute; GB/s "
             f"(transparent huge pages: {doc['thp']}).", "",
             "| fill, huge-page advice on | fill, advice off | spill, fresh files | spill, reused extents |",
             "|---|---|---|---|",
             f"| {doc['fill']['on']:.2f} | {doc['fill']['off']:.2f} | {doc['spill']['fresh']:.2f} | "
             f"{doc['spill']['reuse']:.2f} |", "",
             "ResNet-50 at 224x224, 256 images, batch 64, interleaved pairs (seconds):", "",
             "| pair | calibrate, advice on | calibrate, off | DI score, on | DI score, off |", "|---|---|---|---|---|"]
    for i, (on, off) in enumerate(zip(doc["stages"]["on"], doc["stages"]["off"], strict=True)):
        lines.append(f"| {i + 1} | {on['calibrate']:.1f} | {off['calibrate']:.1f} | {on['score']:.1f} | "
                     f"{off['score']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run every part in a child process and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--pause", type=float, default=3.0)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "cost")
    parser.add_argument("--out", type=Path, default=RESULTS / "fresh_memory.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--option", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child == "fill":
        print(json.dumps(fill(args.rounds, args.pause, args.option == "on")))
        return
    if args.child == "spill":
        print(json.dumps(spill(args.rounds, args.pause, args.option == "reuse", args.work)))
        return
    if args.child == "stages":
        print(json.dumps(stages(args.option == "on", args.work)))
        return
    from pipeline.deployment.bench import machine_info

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    doc: dict[str, Any] = {
        "rounds": args.rounds, "pause": args.pause,
        "thp": thp.read_text().strip() if thp.is_file() else "unknown",
        "fill": {option: _child(args, "fill", option) for option in ("on", "off")},
        "spill": {option: _child(args, "spill", option) for option in ("fresh", "reuse")},
        "stages": {"on": [], "off": []},
    }
    for _ in range(args.pairs):
        for option in ("on", "off"):
            doc["stages"][option].append(_child(args, "stages", option))
            print(option, doc["stages"][option][-1], flush=True)
    doc["machine"] = machine_info()
    print(write_results(args.out, doc, markdown))


if __name__ == "__main__":
    main()

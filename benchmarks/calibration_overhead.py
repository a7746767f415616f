"""Calibration overhead: plain onnxruntime inference vs ``pipeline.calibrate.calibrate`` over the same samples.

Both sides run the same canonical model on the same samples with the same batch size, thread count and CPU
execution provider; both times include creating the session and iterating the dataset. Calibration additionally
canonicalizes and analyses the model, exposes the probes as outputs, pools them and updates the statistics. Each
side is timed ``--repeats`` times (median reported), alternating plain / calibrate so that machine noise hits both.
A cProfile run of one calibration says where the extra time goes.

Models: the shipped demo model ``pipeline/data/mnist_cnn.onnx`` (or, when it is missing, a small torch conv net
exported here) on the shipped MNIST training digits; with ``--resnet18``, torchvision resnet18 (random weights,
10 classes) at 64x64 on random inputs. Writes ``benchmarks/results/calibration_overhead.json``.

Usage: ``python benchmarks/calibration_overhead.py [--samples 2000] [--batch 64] [--threads 2] [--resnet18]``.
On a shared machine set ``OPENBLAS_NUM_THREADS=1``: numpy's small Gram products otherwise spin up BLAS threads that
fight with onnxruntime's (measured here: a 64x128 Gram took 19 ms instead of 0.5 ms under load).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from graph_ops.canonicalize import canonicalize
from graph_ops.io import atomic_write_bytes, load_model, sha256_file
from graph_ops.probes import expose_tensors
from pipeline.bench import machine_info
from pipeline.calibrate import calibrate, default_probes
from pipeline.data import Dataset, from_iterable, from_npz, mnist_path
from pipeline.engines import make_session

RESULTS = Path(__file__).resolve().parent / "results" / "calibration_overhead.json"
DEMO = Path(__file__).resolve().parents[1] / "pipeline" / "data" / "mnist_cnn.onnx"
PROFILE_KEYS = {"channel_summaries": "channel_summaries", "pool_features": "pool_features", "update": "stats_update",
                "canonicalize": "canonicalize", "analyze": "analyze", "make_session": "make_session",
                "acquire": "waiting_for_onnxruntime"}
"""Function name -> label of the cumulative main-thread seconds reported (onnxruntime runs in a worker thread)."""


def _small_cnn(path: Path) -> Path:
    """A VGG-style MNIST CNN with random weights (used only when the shipped demo model is missing)."""
    import torch

    from pipeline.export import export_torch

    torch.manual_seed(0)
    layers: list[Any] = []
    width_in = 1
    for width in (32, 32, "pool", 64, 64, "pool", 128):
        if width == "pool":
            layers.append(torch.nn.MaxPool2d(2))
            continue
        bn = torch.nn.BatchNorm2d(width)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        layers += [torch.nn.Conv2d(width_in, width, 3, padding=1), bn, torch.nn.ReLU()]
        width_in = width
    net = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 10))
    return export_torch(net, torch.zeros(1, 1, 28, 28), path, dynamo=False)


def _resnet18(path: Path) -> Path:
    import torch

    from pipeline.export import export_torch, load_torchvision

    return export_torch(load_torchvision("resnet18", num_classes=10), torch.zeros(1, 3, 64, 64), path)


def _plain(model_bytes: bytes, dataset: Dataset, batch: int, threads: int) -> tuple[float, float]:
    """Wall and process CPU seconds of plain inference (session creation included)."""
    start, cpu = time.perf_counter(), time.process_time()
    session, _ = make_session(model_bytes, "ort-cpu", intra_op_threads=threads)
    name = session.get_inputs()[0].name
    for feeds, _labels in dataset.bind([name]).batches(batch):
        session.run(None, feeds)
    return time.perf_counter() - start, time.process_time() - cpu


def _calibrate(path: Path, dataset: Dataset, batch: int, threads: int, pooling: str) -> tuple[float, float]:
    """Wall and process CPU seconds of one whole calibration."""
    start, cpu = time.perf_counter(), time.process_time()
    calibrate(path, dataset, pooling=pooling, batch_size=batch, backend="ort-cpu", intra_op_threads=threads,
              progress=False)
    return time.perf_counter() - start, time.process_time() - cpu


def _profile(path: Path, dataset: Dataset, batch: int, threads: int, pooling: str) -> dict[str, float]:
    """Cumulative seconds of the main parts of one calibration (cProfile)."""
    profiler = cProfile.Profile()
    profiler.runcall(_calibrate, path, dataset, batch, threads, pooling)  # main thread only
    stats = pstats.Stats(profiler)
    parts: dict[str, float] = {}
    for (_file, _line, func), (_cc, _nc, _tt, cumulative, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        name = func.split(" of ")[0].replace("<method '", "").strip("'>")
        if name in PROFILE_KEYS:
            label = PROFILE_KEYS[name]
            parts[label] = max(parts.get(label, 0.0), cumulative)
    parts["total"] = max(v[3] for v in stats.stats.values())  # type: ignore[attr-defined]
    return {k: round(v, 4) for k, v in sorted(parts.items())}


def _setup(path: Path, threads: int) -> float:
    """Seconds of calibration's fixed work: hash, load, canonicalize, analyse, expose probes, open the session."""
    start = time.perf_counter()
    sha256_file(path)
    canonical = canonicalize(load_model(path))
    exposed = expose_tensors(canonical, default_probes(canonical))
    make_session(exposed.SerializeToString(), "ort-cpu", intra_op_threads=threads)
    return time.perf_counter() - start


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def measure(name: str, path: Path, dataset: Dataset, *, batch: int, threads: int, repeats: int,
            pooling: str) -> dict[str, Any]:
    """Median plain and calibration times (alternating), their ratios, and a profile of one calibration.

    ``ratio`` compares whole runs (plain: open the session and run; calibrate: everything). ``streaming_ratio``
    leaves out the fixed setup of both sides (plain: session creation; calibrate: ``_setup``), i.e. the per-sample
    cost that grows with the dataset. ``cpu_ratio`` compares process CPU time (user + system, all threads) of whole
    runs: the work done, which a loaded machine distorts less than wall time (with ``--threads 1`` onnxruntime has
    no spinning pool threads to inflate it).
    """
    canonical = canonicalize(load_model(path))
    model_bytes = canonical.SerializeToString()
    plain, calib, plain_setup, calib_setup, plain_cpu, calib_cpu = [], [], [], [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        make_session(model_bytes, "ort-cpu", intra_op_threads=threads)
        plain_setup.append(time.perf_counter() - start)
        calib_setup.append(_setup(path, threads))
        for wall, cpu, runner in ((plain, plain_cpu, lambda: _plain(model_bytes, dataset, batch, threads)),
                                  (calib, calib_cpu, lambda: _calibrate(path, dataset, batch, threads, pooling))):
            seconds, cpu_seconds = runner()
            wall.append(seconds)
            cpu.append(cpu_seconds)
    result = {"model": name, "samples": dataset.num_samples, "batch": batch, "threads": threads, "pooling": pooling,
              "probes": len(default_probes(canonical)), "plain_s": [round(t, 4) for t in plain],
              "calibrate_s": [round(t, 4) for t in calib], "plain_median_s": _median(plain),
              "calibrate_median_s": _median(calib), "plain_setup_median_s": _median(plain_setup),
              "calibrate_setup_median_s": _median(calib_setup)}
    result["ratio"] = round(result["calibrate_median_s"] / result["plain_median_s"], 3)
    result["cpu_ratio"] = round(statistics.median(calib_cpu) / statistics.median(plain_cpu), 3)
    result["streaming_ratio"] = round((result["calibrate_median_s"] - result["calibrate_setup_median_s"])
                                      / (result["plain_median_s"] - result["plain_setup_median_s"]), 3)
    result["profile_s"] = _profile(path, dataset, batch, threads, pooling)
    return result


def _random_dataset(n: int, shape: tuple[int, ...], classes: int) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    return from_iterable([(x, np.arange(n) % classes)], name=f"random {n}x{shape}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print one line per model and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pooling", default="gap")
    parser.add_argument("--resnet18", action="store_true", help="also resnet18 at 64x64 (random inputs)")
    parser.add_argument("--resnet-samples", type=int, default=256)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    options = {"batch": args.batch, "threads": args.threads, "repeats": args.repeats, "pooling": args.pooling}
    results = []
    with tempfile.TemporaryDirectory(prefix="diprune-overhead-") as tmp:
        demo = DEMO if DEMO.is_file() else _small_cnn(Path(tmp) / "small_cnn.onnx")
        mnist = from_npz(mnist_path(), split="train", limit=args.samples, mean=0.1307, std=0.3081)
        results.append(measure(demo.name, demo, mnist, **options))
        if args.resnet18:
            data = _random_dataset(args.resnet_samples, (3, 64, 64), 10)
            results.append(measure("resnet18@64x64", _resnet18(Path(tmp) / "resnet18.onnx"), data, **options))
    for r in results:
        print(f"{r['model']}: {r['samples']} samples, batch {r['batch']}, {r['threads']} threads, {r['probes']} probes: "
              f"plain {r['plain_median_s']:.3f} s, calibrate {r['calibrate_median_s']:.3f} s, ratio {r['ratio']:.2f}x, "
              f"without fixed setup {r['streaming_ratio']:.2f}x, CPU time {r['cpu_ratio']:.2f}x; "
              f"profile {r['profile_s']}")
    env = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    report = {"format": "diprune.calibration_overhead/1", "command": " ".join(sys.argv), "machine": machine_info(),
              "thread_env": env, "load_average": list(os.getloadavg()), "results": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.output, json.dumps(report, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

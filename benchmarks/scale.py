"""Scale-out on Ray: wall time of calibration and of lstsq recovery with 1 and 2 workers, the overhead of Ray, and an
estimate for 50,000 images on N GPU workers from the measured per-image costs.

Protocol. torchvision ResNet-18 at 224x224 (seeded random weights with randomised BatchNorm statistics,
``pipeline.model.export.load_torchvision`` + ``export_torch``; no pretrained weights can be downloaded here), 1,000 seeded
uint8 images (labels cycling through 10 classes) in one uncompressed ``.npz`` that every worker opens by path
(ImageNet mean/std), batch 64, default shards (4 batches = 256 images, so 4 shards). In one process, in this order:

* plain onnxruntime inference of the original and of the pruned model over the images (1 intra-op thread): the
  per-image inference costs;
* calibration (``pipeline.calibration.calibrate.calibrate``, gap pooling, with the activation summaries) without Ray, with
  onnxruntime's and numpy's default threads (2 here), and with 1 thread (a child process with
  ``OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=1`` and 1 onnxruntime thread: what a Ray worker with 1 CPU gets); then on a
  local Ray (``ray.init(num_cpus=2)``, its start timed separately) with 1 and with 2 workers (1 CPU each);
* a DI plan at 0.5 of the MACs from those statistics, then lstsq recovery (the default, sequential) the same four
  ways.

Statistics and recovered models of every run are compared with those of the first run: they must be equal to the
last bit (recorded). The overhead of Ray is the 1-worker Ray run minus the 1-thread run without Ray (same compute:
one onnxruntime thread), plus Ray's start. The estimate (see ``estimate``) uses the measured per-image costs; what is
assumed rather than measured is stated in the output.

Run from the repository root: ``python -m benchmarks.scale`` (about 15 minutes on 2 cores; needs the ``[ray]`` and
``[torch]`` extras: ``make bench-scale``); writes ``benchmarks/results/scale.json`` and ``scale.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.output import torchvision_onnx, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def images(work: Path, count: int) -> Path:
    """``count`` seeded uint8 images (NCHW) and labels 0..9 in an uncompressed .npz (written once)."""
    path = work / f"images{count}.npz"
    if not path.is_file():
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (count, 3, 224, 224), dtype=np.uint8)
        np.savez(path, x=x, y=(np.arange(count) % 10).astype(np.int64))
    return path


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, round(time.perf_counter() - start, 3)


def plain_inference(model: Any, data: Any, batch: int) -> float:
    """Seconds of onnxruntime inference (1 thread, session included) over the dataset."""
    from pipeline.model.runtime import feed_batches, make_session, model_input_specs

    start = time.perf_counter()
    session, _ = make_session(model.SerializeToString(), "ort-cpu", intra_op_threads=1)
    for feeds, _ in feed_batches(data, model_input_specs(model), batch):
        session.run(None, feeds)
    return round(time.perf_counter() - start, 3)


def stats_digest(stats: Any) -> str:
    """sha256 of every statistics array, probe by probe (equal digests: equal to the last bit)."""
    digest = hashlib.sha256()
    for name, probe in stats.probes.items():
        digest.update(name.encode())
        for field in ("class_counts", "sum", "class_sums", "gram", "zeros", "abs_sum"):
            digest.update(np.ascontiguousarray(getattr(probe, field)).tobytes())
    return digest.hexdigest()


def job(args: argparse.Namespace, threads: int | None, cluster: Any | None) -> dict[str, Any]:
    """Calibrate, plan (DI, 0.5 of the MACs) and recover one way; timings, digests and the sweep record."""
    from graph_ops.prune import apply_plan
    from pipeline.calibration.calibrate import calibrate
    from pipeline.data.datasets import from_npz
    from pipeline.model.prepare import prepare
    from pipeline.prune.orchestrate import keep_lists, score
    from pipeline.recovery import recover
    from pipeline.selection.allocate import select_channels

    data = from_npz(images(args.work, args.images), mean=IMAGENET[0], std=IMAGENET[1])
    prepared = prepare(torchvision_onnx("resnet18", args.work))
    stats, calibrate_s = timed(calibrate, prepared, data, batch_size=args.batch, intra_op_threads=threads,
                               progress=False, cluster=cluster)
    keep = keep_lists(select_channels(score(prepared, stats, "di"), prepared.index, target_macs=0.5))
    pruned = apply_plan(prepared.model, prepared.index, keep)
    (model, report), recover_s = timed(recover, prepared.model, pruned, prepared.index, keep, data,
                                       batch_size=args.batch, intra_op_threads=threads, spill_dir=str(args.work),
                                       cluster=cluster)
    return {"calibrate_s": calibrate_s, "recover_s": recover_s, "stats_sha256": stats_digest(stats),
            "model_sha256": hashlib.sha256(model.SerializeToString()).hexdigest(), "sweep": report.sweep,
            "pruned": pruned, "prepared": prepared, "data": data}


def single_thread_child(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`job` with 1 thread in a child process whose BLAS is single-threaded too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "benchmarks.scale", "--child", "--images", str(args.images), "--batch",
               str(args.batch), "--work", str(args.work)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from pipeline.cluster import RayOptions

    torchvision_onnx("resnet18", args.work)
    images(args.work, args.images)
    out: dict[str, Any] = {"images": args.images, "batch": args.batch, "load_start": os.getloadavg()}
    runs: dict[str, dict[str, Any]] = {"calibrate": {}, "recover": {}}
    results = {"local, default threads": job(args, None, None), "local, 1 thread": single_thread_child(args)}
    first = results["local, default threads"]
    out["plain_inference_s"] = {"original": plain_inference(first["prepared"].model, first["data"], args.batch),
                                "pruned": plain_inference(first["pruned"], first["data"], args.batch)}
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.get(ray.remote(lambda: 0).remote())  # the first worker process started
    out["ray_start_s"] = round(time.perf_counter() - start, 3)
    try:
        for workers in (1, 2):
            results[f"Ray, {workers} worker{'s' if workers > 1 else ''}"] = job(args, None, RayOptions(workers=workers))
    finally:
        start = time.perf_counter()
        ray.shutdown()
        out["ray_shutdown_s"] = round(time.perf_counter() - start, 3)
    from graph_ops.cost import count
    from graph_ops.proto import declared_shapes

    for name, got in results.items():
        runs["calibrate"][name], runs["recover"][name] = got["calibrate_s"], got["recover_s"]
    out.update(runs=runs, identical={
        "calibrate": all(r["stats_sha256"] == first["stats_sha256"] for r in results.values()),
        "recover": all(r["model_sha256"] == first["model_sha256"] for r in results.values())},
        sweep={name: r["sweep"] for name, r in results.items()},
        digests={name: {"stats": r["stats_sha256"], "model": r["model_sha256"]} for name, r in results.items()},
        macs_fraction=round(count(first["pruned"], declared_shapes(first["pruned"])).macs / first["prepared"].cost.macs,
                            4), load_end=os.getloadavg())
    return out


def estimate(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per-image costs (1 onnxruntime thread, this CPU) and the 50,000-image estimate on N GPU workers."""
    n = result["images"]
    cal = result["runs"]["calibrate"]["local, 1 thread"] / n
    sweep = result["sweep"]["local, 1 thread"]
    rec = (result["runs"]["recover"]["local, 1 thread"] - sweep["solve_s"]) / n
    inf, inf_pruned = (result["plain_inference_s"][k] / n for k in ("original", "pruned"))
    per_level_shard = sweep["moment_bytes"] / sweep["shards"] / max(sweep["levels"], 1)
    target, gpu_s, cores, link = 50_000, args.gpu_ms / 1000, args.cores_per_worker, args.link_gbps / 8 * 1e9
    shard_images = args.batch * 4
    table = []
    for workers in (1, 4, 8, 16):
        shards = -(-target // shard_images)
        calib = result["ray_start_s"] + target * (gpu_s + max(cal - inf, 0.0) / cores) / workers
        moments = max(rec - inf - inf_pruned, 0.0) / cores
        transfer = sweep["levels"] * shards * per_level_shard / link
        recover = result["ray_start_s"] + target * (gpu_s * (1 + inf_pruned / inf) + moments) / workers
        recover += sweep["solve_s"] + transfer
        table.append({"workers": workers, "calibrate_s": round(calib, 1), "recover_s": round(recover, 1),
                      "recover_transfer_s": round(transfer, 1)})
    return {"per_image_s": {"calibrate": round(cal, 5), "recover_without_solves": round(rec, 5),
                            "inference_original": round(inf, 5), "inference_pruned": round(inf_pruned, 5)},
            "driver_solve_s": sweep["solve_s"], "moment_bytes_per_shard_and_level": int(per_level_shard),
            "levels": sweep["levels"],
            "assumed": {"gpu_inference_ms_per_image": args.gpu_ms, "cpu_cores_per_worker": cores,
                        "link_gbit_s": args.link_gbps, "shard_images": shard_images},
            "cpu_workers_like_these_s": {"calibrate": round(target * cal, 1), "recover": round(target * rec, 1)},
            "gpu_workers": table}


def markdown(result: dict[str, Any]) -> str:
    runs, est = result["runs"], result["estimate"]
    lines = [f"# Scale-out on Ray: ResNet-18 at 224x224, {result['images']} images, batch {result['batch']}", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores_available']} cores; load average "
             f"{result['load_start'][0]:.2f} before, {result['load_end'][0]:.2f} after "
             "(the machine was shared with other jobs: absolute times are noisy).", "",
             "| run | calibrate (s) | lstsq recovery (s) |", "|---|---|---|"]
    lines += [f"| {name} | {runs['calibrate'][name]:.1f} | {runs['recover'][name]:.1f} |" for name in runs["calibrate"]]
    local1 = runs["calibrate"]["local, 1 thread"], runs["recover"]["local, 1 thread"]
    ray1 = runs["calibrate"]["Ray, 1 worker"], runs["recover"]["Ray, 1 worker"]
    groups: dict[str, list[str]] = {}
    for name, digest in result["digests"].items():
        groups.setdefault(f"{digest['stats'][:12]} / {digest['model'][:12]}", []).append(name)
    lines += ["", "Statistics / recovered model (sha256 prefixes; equal digests are equal to the last bit): "
              + "; ".join(f"{key}: {', '.join(names)}" for key, names in groups.items()) + ".", "",
              f"Overhead of Ray: start {result['ray_start_s']:.1f} s (ray.init and the first worker process), "
              f"shutdown {result['ray_shutdown_s']:.1f} s; 1 Ray worker minus the same compute without Ray "
              f"(1 onnxruntime thread): calibration {ray1[0] - local1[0]:+.1f} s, recovery {ray1[1] - local1[1]:+.1f} s.",
              "", "## Estimate: 50,000 images on N GPU workers", "",
              f"Measured per image here (1 thread): calibration {est['per_image_s']['calibrate'] * 1e3:.1f} ms, "
              f"recovery {est['per_image_s']['recover_without_solves'] * 1e3:.1f} ms, of which onnxruntime "
              f"inference of the original {est['per_image_s']['inference_original'] * 1e3:.1f} ms and of the pruned "
              f"model {est['per_image_s']['inference_pruned'] * 1e3:.1f} ms; the driver's merges and solves "
              f"{est['driver_solve_s']:.1f} s in all ({est['levels']} levels); moments per shard and level "
              f"{est['moment_bytes_per_shard_and_level'] / 2**20:.0f} MiB.", "",
              f"Assumed, not measured here: {est['assumed']['gpu_inference_ms_per_image']} ms of GPU inference per "
              f"image (onnxruntime-gpu), the rest (statistics and moments, numpy float64) on "
              f"{est['assumed']['cpu_cores_per_worker']} CPU cores per worker scaling linearly, "
              f"{est['assumed']['link_gbit_s']} Gbit/s to the driver, shards of "
              f"{est['assumed']['shard_images']} images.", "",
              "| GPU workers | calibrate (s) | lstsq recovery (s) | of which moments to the driver (s) |",
              "|---|---|---|---|"]
    lines += [f"| {row['workers']} | {row['calibrate_s']:.0f} | {row['recover_s']:.0f} | "
              f"{row['recover_transfer_s']:.0f} |" for row in est["gpu_workers"]]
    lines += ["", f"On CPU workers like these cores (1 thread each, no assumption): 50,000 images take "
                  f"{est['cpu_workers_like_these_s']['calibrate']:.0f} s of calibration and "
                  f"{est['cpu_workers_like_these_s']['recover']:.0f} s of recovery per worker-thread, divided by "
                  "the number of workers.", ""]
    return "\n".join(lines)


def main() -> None:
    from pipeline.deployment.bench import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "scale")
    parser.add_argument("--gpu-ms", type=float, default=1.0, help="assumed GPU inference ms per image")
    parser.add_argument("--cores-per-worker", type=int, default=8, help="assumed CPU cores per GPU worker")
    parser.add_argument("--link-gbps", type=float, default=10.0, help="assumed network to the driver (Gbit/s)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.child:
        got = job(args, 1, None)
        print(json.dumps({k: v for k, v in got.items() if k not in ("pruned", "prepared", "data")}))
        return
    result = {"machine": machine_info(), **measure(args)}
    result["estimate"] = estimate(result, args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out / "scale.json", result, markdown)
    print(markdown(result))


if __name__ == "__main__":
    main()

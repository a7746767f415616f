"""Drive NVIDIA ``trtexec`` and read its performance summary.

``parse_summary`` turns the text trtexec prints after ``=== Performance summary ===`` into a dict. Two layouts exist:

* TensorRT >= 8.x, one line per metric:
  ``[I] GPU Compute Time: min = 0.80 ms, max = 4.93 ms, mean = 0.81 ms, median = 0.80 ms, percentile(90%) = ...``
* TensorRT 7.x, one line per statistic under a metric header (``[I] GPU Compute`` then ``[I] min: 9.7 ms``, ...,
  ``[I] percentile: 10.49 ms at 99%``).

Metric names become snake_case keys (``gpu_compute_time``, ``latency``, ``h2d_latency``, ``enqueue_time``, ...), each
a dict of ``min``/``max``/``mean``/``median``/``p90``/``p95``/``p99`` in milliseconds; ``throughput_qps``,
``total_host_walltime_s`` and ``total_gpu_compute_time_s`` are floats; ``gpu_compute_cv_percent`` is taken from the
"coefficient of variance" warning when present; ``tensorrt_version`` from the ``&&&& ... [TensorRT v101600]`` line.
Times in the log's seconds or microseconds are converted to milliseconds.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graph_ops.errors import UserInputError

_PREFIX = r"^(?:\[[^\]]*\]\s*)*"  # "[INFO] [05/27/2023-12:05:31] [I] " and similar
_STAT = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=\s*([-\d.eE+]+)\s*(ms|s|us)")
_SCALE = {"ms": 1.0, "s": 1e3, "us": 1e-3}
_KEYS = {"min": "min", "max": "max", "mean": "mean", "median": "median"}
_OLD_STAT = re.compile(_PREFIX + r"(min|max|mean|median|percentile):\s*([-\d.eE+]+)\s*(ms|s|us)(?:\s+at\s+(\d+)%)?")


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def _percentile_key(value: str) -> str:
    number = float(value)
    return f"p{int(number)}" if number.is_integer() else f"p{value.replace('.', '_')}"


def _parse_new_style(lines: list[str], out: dict[str, Any]) -> None:
    for line in lines:
        body = re.sub(_PREFIX, "", line)
        if ":" not in body:
            continue
        name, rest = body.split(":", 1)
        stats = _STAT.findall(rest)
        if stats and "=" in rest:
            metric = {}
            for label, pct, value, unit in stats:
                metric[_percentile_key(pct) if pct else _KEYS[label]] = float(value) * _SCALE[unit]
            out[_key(name)] = metric
            continue
        total = re.match(r"\s*([-\d.eE+]+)\s*(ms|s|us)\s*$", rest)
        if total and name.strip().lower().startswith("total"):
            out[_key(name) + "_s"] = float(total.group(1)) * _SCALE[total.group(2)] / 1e3


def _parse_old_style(lines: list[str], out: dict[str, Any]) -> None:
    metric: str | None = None
    for line in lines:
        body = re.sub(_PREFIX, "", line).strip()
        stat = _OLD_STAT.match(line)
        if stat and metric:
            label, value, unit, pct = stat.groups()
            key = _percentile_key(pct or "99") if label == "percentile" else label
            out.setdefault(metric, {})[key] = float(value) * _SCALE[unit]
        elif body and ":" not in body and "=" not in body:
            metric = _key(body)
            if metric == "gpu_compute":
                metric = "gpu_compute_time"
        elif body.lower().startswith("total compute time") and metric:
            total = re.search(r"([-\d.eE+]+)\s*(ms|s|us)", body)
            if total:
                out["total_gpu_compute_time_s"] = float(total.group(1)) * _SCALE[total.group(2)] / 1e3


def parse_summary(text: str) -> dict[str, Any]:
    """Parse trtexec output (the whole log or just its performance summary) into a dict; see the module docs.

    Raises:
        UserInputError: the text has no performance summary (e.g. the build failed or inference was skipped).
    """
    marker = text.rfind("=== Performance summary ===")
    lines = text[marker:].splitlines()[1:] if marker >= 0 else text.splitlines()
    out: dict[str, Any] = {}
    throughput = re.search(r"Throughput:\s*([-\d.eE+]+)\s*qps", text)
    if throughput:
        out["throughput_qps"] = float(throughput.group(1))
    _parse_new_style(lines, out)
    if "gpu_compute_time" not in out:
        _parse_old_style(lines, out)
    if "gpu_compute_time" not in out and "throughput_qps" not in out:
        raise UserInputError("no trtexec performance summary found (did the build fail or was --skipInference set?)")
    cv = re.search(r"coefficient of variance\s*=\s*([-\d.eE+]+)%", text)
    if cv:
        out["gpu_compute_cv_percent"] = float(cv.group(1))
    version = re.search(r"\[TensorRT v(\d+)\]", text)
    if version:
        out["tensorrt_version"] = int(version.group(1))
    return out


def find_trtexec() -> str | None:
    """Path of ``trtexec`` on PATH (or in /usr/src/tensorrt/bin), or None."""
    found = shutil.which("trtexec")
    fallback = Path("/usr/src/tensorrt/bin/trtexec")
    return found or (str(fallback) if fallback.is_file() else None)


PRECISION_FLAGS: dict[str, tuple[str, ...]] = {"fp32": (), "fp16": ("--fp16",), "int8": ("--int8", "--fp16")}
"""trtexec flags per precision (int8 with fp16 allowed for the layers left unquantized)."""
PROFILE_FLAGS = ("--separateProfileRun", "--profilingVerbosity=detailed", "--noDataTransfers")
"""Flags of a profiling run: per-layer times from a run of their own (the timed run stays unprofiled), layer info
with the ONNX node names, GPU compute only."""


def trtexec_args(onnx_path: str | Path, *, shapes: str | None = None, precision: str = "fp32",
                 engine: str | Path | None = None, timing_cache: str | Path | None = None,
                 profile: str | Path | None = None, layer_info: str | Path | None = None,
                 extra: Sequence[str] = ()) -> list[str]:
    """trtexec's arguments (no program name): build (saving the engine and timing cache) and time with CUDA graphs,
    spin-wait; with ``profile`` / ``layer_info`` also a separate profiling run exporting per-layer times
    (``--exportProfile``) and the layers' ONNX nodes (``--exportLayerInfo``)."""
    if precision not in PRECISION_FLAGS:
        raise UserInputError(f"unknown precision '{precision}'; choose fp32, fp16 or int8")
    args = [f"--onnx={onnx_path}", *PRECISION_FLAGS[precision]]
    if shapes:
        args.append(f"--shapes={shapes}")
    if engine:
        args.append(f"--saveEngine={engine}")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    args += ["--useCudaGraph", "--useSpinWait", "--percentile=90,95,99"]
    if profile or layer_info:
        args += PROFILE_FLAGS
    if profile:
        args.append(f"--exportProfile={profile}")
    if layer_info:
        args.append(f"--exportLayerInfo={layer_info}")
    return [*args, *extra]


def trtexec_command(onnx_path: str | Path, *, shapes: str | None = None, precision: str = "fp32",
                    engine: str | Path | None = None, timing_cache: str | Path | None = None,
                    extra: Sequence[str] = ()) -> list[str]:
    """The trtexec command line on this machine (:func:`trtexec_args` after the trtexec found here)."""
    exe = find_trtexec()
    if exe is None:
        raise UserInputError("trtexec is not on PATH; install TensorRT or use the tensorrt Python backend")
    return [exe, *trtexec_args(onnx_path, shapes=shapes, precision=precision, engine=engine,
                               timing_cache=timing_cache, extra=extra)]


def run_trtexec(onnx_path: str | Path, *, timeout_s: float = 600.0, **options: Any) -> dict[str, Any]:
    """Run trtexec on a model (options as for :func:`trtexec_command`) and parse its summary."""
    cmd = trtexec_command(onnx_path, **options)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as err:
        raise UserInputError(f"trtexec did not finish in {timeout_s:.0f} s: {' '.join(cmd)}") from err
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-5:])
        raise UserInputError(f"trtexec failed (exit {done.returncode}): {tail}")
    result = parse_summary(done.stdout)
    result["command"] = cmd
    return result

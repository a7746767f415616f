"""Latency benchmark: warm-up by time, interleaved rounds, robust per-pair ratios, machine record.

Protocol for ``measure(models, backend, batches)``, per batch size:

1. every model gets fixed inputs (seeded random, or the first ``batch`` samples of an .npz) and is warmed up for
   ``warmup_s`` seconds;
2. ``rounds`` interleaved rounds follow (A B A B ...); in each round every model runs until it has done at least
   ``ceil(min_iters / rounds)`` calls and ``min_duration_s / rounds`` seconds, so that in total each model has at
   least ``min_iters`` timed calls and ``min_duration_s`` seconds;
3. per model: mean, median, p90/p95/p99 (numpy ``linear`` percentiles), min, max, coefficient of variation
   (std / mean, ddof=1) and throughput (batch / mean seconds, samples per second);
4. per model other than the first: in each round r the ratio ``median_r(model) / median_r(first)``; the reported
   ratio is the median of these per-round ratios. Slow drifts of the machine (thermal, other load) hit both models
   of a round alike and cancel in the ratio, which a ratio of overall medians would not do.

The report records the thread settings, the execution providers actually active and the machine (CPU model, cores,
library versions), and warns when a model has Conv layers whose output channel count is not a multiple of
``round_to`` (hardware kernels pad such widths, so FLOPs saved below a multiple may buy nothing), and when timings
are noise-dominated: a coefficient of variation of the per-call latencies above ``NOISY_CV`` (0.25: the spread of
single calls is a quarter of their mean, so a difference of a few percent between models is within the noise of
their medians on few calls; another load on the machine, frequency scaling or too short a run). The JSON's
``noise`` lists every such (model, batch) with its CV and the bound.

Settings are bounded (``MAX_SECONDS`` per warm-up or timed phase, ``MAX_ITERATIONS``, ``MAX_ROUNDS``): a value above
them is a typo that would run for hours, refused by the CLI and the run config.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graph_ops.errors import UserInputError, VerificationError
from graph_ops.io import check_finite_weights, load_model, sha256_file
from pipeline.deployment.engines import check_backend, time_calls
from pipeline.model.runtime import ORT_BACKENDS, load_npz, make_feeds, make_session

logger = logging.getLogger(__name__)

FORMAT = "diprune.bench/1"
# Parity tolerances of TensorRT against onnxruntime CPU (relative to the reference output's max |value|).
TRT_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 1e-1}
NOISY_CV = 0.25
"""Per-call latencies with a coefficient of variation (std / mean) above this are reported as noise-dominated."""
MAX_SECONDS = 3600.0
"""Longest warm-up or timed phase per model and batch (seconds)."""
MAX_ITERATIONS = 1_000_000
"""Most timed iterations per model and batch."""
MAX_ROUNDS = 1000
"""Most interleaved rounds."""


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-iteration latencies (seconds) of one model at one batch size."""

    n: int
    mean_s: float
    median_s: float
    p90_s: float
    p95_s: float
    p99_s: float
    min_s: float
    max_s: float
    cv: float
    throughput: float

    @classmethod
    def from_samples(cls, seconds: Sequence[float] | np.ndarray, batch: int = 1) -> LatencyStats:
        """Summarise an array of per-iteration seconds; ``throughput`` is samples per second at ``batch``."""
        x = np.asarray(seconds, dtype=np.float64)
        if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
            raise ValueError("latency samples must be a non-empty 1-D array of finite seconds")
        mean = float(x.mean())
        p50, p90, p95, p99 = (float(v) for v in np.percentile(x, [50, 90, 95, 99]))
        cv = float(x.std(ddof=1) / mean) if x.size > 1 and mean > 0 else 0.0
        return cls(n=int(x.size), mean_s=mean, median_s=p50, p90_s=p90, p95_s=p95, p99_s=p99,
                   min_s=float(x.min()), max_s=float(x.max()), cv=cv,
                   throughput=batch / mean if mean > 0 else math.inf)


@dataclass(frozen=True)
class ModelResult:
    """Measurements of one model at one batch size."""

    model: str
    batch: int
    latency: LatencyStats
    round_medians_s: tuple[float, ...]
    gpu_compute: LatencyStats | None = None
    h2d: LatencyStats | None = None
    d2h: LatencyStats | None = None


@dataclass(frozen=True)
class Comparison:
    """A model against the first model at one batch size: per-round ratios of medians and their median."""

    baseline: str
    model: str
    batch: int
    ratios: tuple[float, ...]

    @property
    def ratio(self) -> float:
        """Median over rounds of (model median / baseline median); < 1 means faster than the baseline."""
        return float(np.median(self.ratios))

    @property
    def speedup(self) -> float:
        """Baseline time over model time (1 / ratio)."""
        return 1.0 / self.ratio


@dataclass(frozen=True)
class BenchReport:
    """Everything ``measure`` found, with the settings and the machine it ran on."""

    backend: str
    settings: Mapping[str, Any]
    machine: Mapping[str, Any]
    models: tuple[Mapping[str, Any], ...]
    results: tuple[ModelResult, ...]
    comparisons: tuple[Comparison, ...]
    schedule: tuple[tuple[int, int, int], ...]
    warnings: tuple[str, ...] = field(default=())

    def result(self, model: str, batch: int) -> ModelResult:
        """The result of ``model`` (as given to ``measure``) at ``batch``."""
        return next(r for r in self.results if r.model == model and r.batch == batch)

    def noisy(self) -> list[dict[str, Any]]:
        """Every (model, batch) whose per-call latencies have a CV above ``NOISY_CV``."""
        return [{"model": r.model, "batch": r.batch, "cv": round(r.latency.cv, 4)} for r in self.results
                if r.latency.cv > NOISY_CV]

    def noise_warnings(self) -> list[str]:
        """One line per noise-dominated (model, batch) (module docstring)."""
        return [f"{Path(n['model']).name} batch {n['batch']}: timings are noise-dominated (per-call CV {n['cv']:.2f} "
                f"> {NOISY_CV}); compare with care: stop other load, pin --threads, or raise --warmup / --duration"
                for n in self.noisy()]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (format ``diprune.bench/1``)."""
        comparisons = [{**asdict(c), "ratio": c.ratio, "speedup": c.speedup} for c in self.comparisons]
        return {"format": FORMAT, "backend": self.backend, "settings": dict(self.settings),
                "machine": dict(self.machine), "models": [dict(m) for m in self.models],
                "results": [asdict(r) for r in self.results], "comparisons": comparisons,
                "schedule": [list(s) for s in self.schedule], "warnings": list(self.warnings),
                "noise": {"cv_bound": NOISY_CV, "noisy": self.noisy()}}

    def to_json(self) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=1)

    def to_markdown(self) -> str:
        """A table per the results (times in ms) with the ratio against the first model, then warnings."""
        ratio = {(c.model, c.batch): c for c in self.comparisons}
        lines = [f"backend {self.backend}; threads {self.settings.get('threads')}; "
                 f"cpu {self.machine.get('cpu')} ({self.machine.get('cores_available')} cores)", "",
                 "| model | batch | mean ms | median ms | p90 ms | p95 ms | p99 ms | min ms | max ms | CV | "
                 "samples/s | ratio vs first |", "|" + "---|" * 12]
        for r in self.results:
            s, c = r.latency, ratio.get((r.model, r.batch))
            ms = [f"{v * 1e3:.3f}" for v in (s.mean_s, s.median_s, s.p90_s, s.p95_s, s.p99_s, s.min_s, s.max_s)]
            rel = f"{c.ratio:.3f} ({c.speedup:.2f}x)" if c else "1 (baseline)"
            lines.append(f"| {Path(r.model).name} | {r.batch} | {' | '.join(ms)} | {s.cv:.3f} | "
                         f"{s.throughput:.1f} | {rel} |")
        lines += [f"GPU compute {Path(r.model).name} batch {r.batch}: median {r.gpu_compute.median_s * 1e3:.3f} ms "
                  f"(H2D {r.h2d.median_s * 1e3:.3f} ms, D2H {r.d2h.median_s * 1e3:.3f} ms)"
                  for r in self.results if r.gpu_compute is not None and r.h2d is not None and r.d2h is not None]
        lines += ["", *(f"providers {m['path']}: {', '.join(m['providers'])}" for m in self.models)]
        lines += [f"WARNING: {w}" for w in (*self.warnings, *self.noise_warnings())]
        return "\n".join(lines)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, platform and library versions (no heavy imports)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    packages = ("numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu12", "torch")
    versions = {p: v for p in packages if (v := _version(p)) is not None}
    import onnxruntime as ort

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores_logical": os.cpu_count(), "cores_available": available,
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions,
            "ort_available_providers": list(ort.get_available_providers())}


def width_warnings(model: onnx.ModelProto, name: str, round_to: int) -> list[str]:
    """One warning naming the Conv layers whose output channels are not multiples of ``round_to`` (if any).

    Convs that write a graph output (a head whose width the task fixes) are not counted.
    """
    if round_to <= 1:
        return []
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    outputs = {out.name for out in model.graph.output}
    odd = []
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in shapes and node.output[0] not in outputs:
            width = shapes[node.input[1]][0]
            if width % round_to:
                odd.append(f"{node.name or node.output[0]}={width}")
    if not odd:
        return []
    shown = ", ".join(odd[:8]) + (f", ... ({len(odd) - 8} more)" if len(odd) > 8 else "")
    return [f"{name}: {len(odd)} Conv layer(s) with output channels not multiples of {round_to}: {shown}"]


def _check_parity(model: str, session: Any, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                  precision: str) -> None:
    """TensorRT outputs against onnxruntime CPU: max |diff| <= tol * max |reference| per output."""
    reference = dict(zip([o.name for o in session.get_outputs()], session.run(None, dict(feeds)), strict=True))
    tol = TRT_TOLERANCE[precision]
    for name, ref in reference.items():
        got = outputs[name].astype(np.float64)
        err = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))
        if err > tol:
            raise VerificationError(f"{model}: TensorRT {precision} output {name} differs from onnxruntime by "
                                    f"{err:.3g} (relative to max |ref|) > tolerance {tol}; not timing it")
        logger.info("%s: TensorRT %s parity on %s ok (%.3g <= %g)", model, precision, name, err, tol)


def _runner(model: str, backend: str, batch: int, opts: Mapping[str, Any]) -> tuple[Callable[[], Any], Any]:
    """Fixed inputs for ``batch`` and a zero-argument callable running the model on them (and the TrtRunner)."""
    session, _ = make_session(model, backend if backend in ORT_BACKENDS else "ort-cpu", opts["threads"])
    feeds = make_feeds(session, batch, seed=opts["seed"], data=opts["data"], model=model,
                       input_shapes=opts["input_shapes"])
    if backend in ORT_BACKENDS:
        return (lambda: session.run(None, feeds)), None
    from pipeline.deployment.engines import TrtRunner, build_engine

    precision = opts["precision"]
    base = (Path(opts["workdir"]) if opts["workdir"] else Path(model).parent) / Path(model).stem
    engine = build_engine(model, {k: v.shape for k, v in feeds.items()}, f"{base}.b{batch}.{precision}.engine",
                          precision=precision, timing_cache=f"{base}.timing.cache",
                          calibration=[feeds] if precision == "int8" else None)
    runner = TrtRunner(engine, feeds)
    runner()
    _check_parity(model, session, feeds, runner.outputs, precision)
    return runner, runner


def _describe(paths: Sequence[str], backend: str, threads: int | None, round_to: int) -> tuple[list, list[str]]:
    """Per model: identity, active providers, thread settings; and the width warnings."""
    infos, warnings = [], []
    for path in paths:
        session, providers = make_session(path, backend if backend in ORT_BACKENDS else "ort-cpu", threads)
        options = session.get_session_options()
        infos.append({"path": path, "sha256": sha256_file(path),
                      "providers": list(providers) if backend in ORT_BACKENDS else ["TensorRT"],
                      "intra_op_threads": options.intra_op_num_threads or "default (one per physical core)",
                      "inter_op_threads": options.inter_op_num_threads or "default"})
        proto = load_model(path)
        check_finite_weights(proto, path)  # a NaN model is broken: refused by every command, bench included
        warnings += width_warnings(proto, Path(path).name, round_to)
    return infos, warnings


def _measure_batch(paths: Sequence[str], backend: str, batch: int, opts: Mapping[str, Any],
                   bar: Any = None) -> tuple[list, list, list]:
    """Warm up every model, then the interleaved rounds; results, comparisons and schedule of one batch size."""
    runners = []
    for path in paths:
        run, trt_runner = _runner(path, backend, batch, opts)
        time_calls(run, min_duration_s=opts["warmup_s"], min_iters=1)
        if trt_runner is not None:
            trt_runner.clear_times()
        runners.append((run, trt_runner))
    rounds = opts["rounds"]
    per_round_iters, per_round_s = math.ceil(opts["min_iters"] / rounds), opts["min_duration_s"] / rounds
    samples: list[list[np.ndarray]] = [[] for _ in paths]
    schedule = []
    for r in range(rounds):
        for i, (run, _) in enumerate(runners):
            schedule.append((r, i, batch))
            samples[i].append(time_calls(run, min_duration_s=per_round_s, min_iters=per_round_iters))
            if bar is not None:
                bar.update(1)
    medians = [[float(np.median(s)) for s in per_model] for per_model in samples]
    results = [_model_result(path, batch, samples[i], medians[i], runners[i][1]) for i, path in enumerate(paths)]
    comparisons = [Comparison(baseline=paths[0], model=path, batch=batch,
                              ratios=tuple(m / b for m, b in zip(medians[i], medians[0], strict=True)))
                   for i, path in enumerate(paths) if i]
    return results, comparisons, schedule


def measure(models: Sequence[str | Path], backend: str = "ort-cpu", batches: Sequence[int] = (1,), *,
            warmup_s: float = 1.0, min_duration_s: float = 3.0, min_iters: int = 30, rounds: int = 5, seed: int = 0,
            threads: int | None = None, data: str | Path | Mapping[str, np.ndarray] | None = None,
            round_to: int = 8, precision: str = "fp32", workdir: str | Path | None = None,
            progress: bool = False, input_shapes: Mapping[str, Sequence[int]] | None = None) -> BenchReport:
    """Measure the latency of ``models`` on ``backend`` at each batch size, in interleaved rounds.

    Args:
        models: ONNX files; the first is the baseline of the ratios.
        backend: ``ort-cpu``, ``ort-cuda``, ``ort-trt`` or ``tensorrt``.
        batches: batch sizes.
        warmup_s: warm-up seconds per model and batch (before the rounds).
        min_duration_s: minimum timed seconds per model and batch, spread over the rounds.
        min_iters: minimum timed calls per model and batch, spread over the rounds.
        rounds: number of interleaved rounds (A B A B ...).
        seed: seed of the random inputs.
        threads: onnxruntime intra-op threads (None: onnxruntime default).
        data: an .npz path (or loaded arrays) to take inputs from instead of random ones.
        round_to: warn about Conv output channels that are not multiples of this (<= 1: no warning).
        precision: TensorRT precision (``tensorrt`` backend only; parity with onnxruntime is checked first).
        workdir: where TensorRT engines and caches go (default: beside each model).
        progress: a tqdm bar on stderr over the timed (round, model) slots.
        input_shapes: dims of inputs with symbolic sizes besides the batch (``{"images": (1, 3, 640, 640)}``).

    Returns:
        The frozen report.
    """
    check_backend(backend)
    if not models:
        raise UserInputError("give at least one model to benchmark")
    if rounds < 1 or min_iters < 1 or not batches or any(b < 1 for b in batches):
        raise UserInputError("rounds, iterations and batch sizes must be positive integers")
    if not (0 <= warmup_s <= MAX_SECONDS and 0 <= min_duration_s <= MAX_SECONDS) or min_iters > MAX_ITERATIONS \
            or rounds > MAX_ROUNDS:
        raise UserInputError(f"bench settings out of range: warm-up and duration are 0..{MAX_SECONDS:g} s, iterations "
                             f"at most {MAX_ITERATIONS}, rounds at most {MAX_ROUNDS}")
    paths = [str(m) for m in models]
    opts = {"warmup_s": warmup_s, "min_duration_s": min_duration_s, "min_iters": min_iters, "rounds": rounds,
            "seed": seed, "threads": threads, "data": load_npz(data), "precision": precision, "workdir": workdir,
            "input_shapes": {k: list(v) for k, v in (input_shapes or {}).items()}}
    infos, warnings = _describe(paths, backend, threads, round_to)
    results, comparisons, schedule = [], [], []
    from tqdm import tqdm

    with tqdm(total=len(batches) * rounds * len(paths), desc="bench", unit="slot", file=sys.stderr,
              disable=not progress) as bar:
        for batch in batches:
            batch_results, batch_comparisons, batch_schedule = _measure_batch(paths, backend, batch, opts, bar)
            results += batch_results
            comparisons += batch_comparisons
            schedule += batch_schedule
    for w in warnings:
        logger.warning(w)
    settings = {**{k: v for k, v in opts.items() if k not in ("data", "workdir")}, "round_to": round_to,
                "data": None if data is None else "<arrays>" if isinstance(data, Mapping) else str(data),
                "precision": precision if backend == "tensorrt" else None}
    report = BenchReport(backend=backend, settings=settings, machine=machine_info(), models=tuple(infos),
                         results=tuple(results), comparisons=tuple(comparisons), schedule=tuple(schedule),
                         warnings=tuple(warnings))
    for w in report.noise_warnings():
        logger.warning(w)
    return report


def _model_result(path: str, batch: int, samples: list[np.ndarray], medians: list[float], trt_runner: Any) -> ModelResult:
    latency = LatencyStats.from_samples(np.concatenate(samples), batch)
    extra: dict[str, LatencyStats] = {}
    if trt_runner is not None and trt_runner.gpu_compute_s:
        extra = {"gpu_compute": LatencyStats.from_samples(trt_runner.gpu_compute_s, batch),
                 "h2d": LatencyStats.from_samples(trt_runner.h2d_s, batch),
                 "d2h": LatencyStats.from_samples(trt_runner.d2h_s, batch)}
    return ModelResult(model=path, batch=batch, latency=latency, round_medians_s=tuple(medians), **extra)

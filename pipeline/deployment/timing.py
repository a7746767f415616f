"""Timing on the real runtime for the latency model and the latency budget: kernel profiles and interleaved ratios.

* :func:`profile_kernels` runs a model with onnxruntime's profiler on and returns, per kernel the runtime actually
  executed (after its own fusions and layout changes), the median duration over the timed runs. Kernels are keyed
  by ``(name, occurrence)``: onnxruntime's kernel name and how many kernels of that name ran before it in one run,
  which is stable across models that differ only in channel widths.
* :func:`interleaved_ratios` times in-memory models with the protocol of :mod:`pipeline.deployment.bench` (fixed seeded inputs,
  warm-up, interleaved rounds A B C A B C ..., per-round medians) and returns each model's latency relative to the
  first as the median over rounds of ``median_r(model) / median_r(first)``: drifts of a shared machine hit every
  model of a round alike and cancel in the ratio.

Sessions come from :func:`pipeline.model.runtime.make_session` (the one onnxruntime home); the timing loop is
:func:`pipeline.deployment.engines.time_calls`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.deployment.engines import time_calls
from pipeline.errors import UserInputError
from pipeline.model.runtime import ORT_BACKENDS, make_feeds, make_session

CONV_LIKE = frozenset({"Conv", "FusedConv", "NhwcConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul",
                       "FusedMatMul", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                       "ConvTranspose"})
"""onnxruntime kernels that compute a Conv / Gemm / MatMul of the original graph (possibly fused)."""


@dataclass(frozen=True)
class KernelTime:
    """One kernel of a profiled run: key, onnxruntime's op, the shape of its second input, median microseconds."""

    name: str
    occurrence: int
    op: str
    weight_shape: tuple[int, ...] | None
    median_us: float


@dataclass(frozen=True)
class KernelProfile:
    """Every kernel of one model in execution order, the median run time and the providers that ran it."""

    kernels: tuple[KernelTime, ...]
    run_us: float
    runs: int
    providers: tuple[str, ...]

    @property
    def kernel_us(self) -> float:
        """Sum of the kernels' median durations."""
        return float(sum(k.median_us for k in self.kernels))


def check_latency_backend(backend: str) -> str:
    """The latency model runs on onnxruntime backends only (TensorRT engines have no per-kernel names to map)."""
    if backend not in ORT_BACKENDS:
        raise UserInputError(f"the latency model measures onnxruntime backends ({', '.join(ORT_BACKENDS)}) here, not "
                             f"{backend!r}; for a TensorRT board, plan against a latency model fitted on the board's "
                             f"own profiles: diprune latency variants / latency fit, then --latency-model FILE")
    return backend


def _events(path: str) -> list[dict]:
    try:
        return json.loads(Path(path).read_text())
    finally:
        Path(path).unlink(missing_ok=True)


def profile_kernels(model: bytes, *, backend: str = "ort-cpu", batch: int = 1, threads: int | None = None,
                    runs: int = 5, warmup: int = 2, min_seconds: float = 0.3, seed: int = 0) -> KernelProfile:
    """Per-kernel median durations of ``model`` (serialized) over at least ``runs`` timed runs and ``min_seconds``.

    The first ``warmup`` runs are discarded (allocation, pre-packing).
    """
    check_latency_backend(backend)
    with tempfile.TemporaryDirectory(prefix="diprune-profile-") as tmp:
        session, providers = make_session(model, backend, threads, profile_prefix=os.path.join(tmp, "run"))
        feeds = make_feeds(session, batch, seed=seed)
        for _ in range(warmup):
            session.run(None, feeds)
        time_calls(lambda: session.run(None, feeds), min_duration_s=min_seconds, min_iters=runs)
        events = _events(session.end_profiling())
    return kernels_from_events(events, warmup=warmup, providers=providers)


def kernels_from_events(events: Sequence[dict], *, warmup: int = 0, providers: Sequence[str] = ()) -> KernelProfile:
    """The :class:`KernelProfile` of an onnxruntime profile (the JSON list of trace events ``end_profiling`` writes),
    its first ``warmup`` runs discarded.

    Raises:
        UserInputError: the profile holds no timed run.
    """
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[warmup:]
    if not spans:
        raise UserInputError("the onnxruntime profile holds no timed run ('model_run' events after the warm-up); "
                             "is profiling supported by this build?")
    starts = np.array([s for s, _ in spans])
    per_run: list[list[tuple[str, str, tuple[int, ...] | None, float]]] = [[] for _ in spans]
    for event in sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                        key=lambda e: e["ts"]):
        run = int(np.searchsorted(starts, event["ts"], side="right")) - 1
        if run < 0 or event["ts"] > spans[run][1]:
            continue
        args = event.get("args", {})
        shapes = args.get("input_type_shape") or []
        weight = tuple(next(iter(shapes[1].values()))) if len(shapes) > 1 and shapes[1] else None
        per_run[run].append((event["name"][:-len("_kernel_time")], args.get("op_name", ""), weight, event["dur"]))
    durations: dict[tuple[str, int], list[float]] = defaultdict(list)
    info: dict[tuple[str, int], tuple[str, tuple[int, ...] | None]] = {}
    order: list[tuple[str, int]] = []
    for kernels in per_run:
        seen: Counter[str] = Counter()
        for name, op, weight, dur in kernels:
            key = (name, seen[name])
            seen[name] += 1
            if key not in info:
                info[key] = (op, weight)
                order.append(key)
            durations[key].append(float(dur))
    out = tuple(KernelTime(name, occ, info[(name, occ)][0], info[(name, occ)][1],
                           float(np.median(durations[(name, occ)]))) for name, occ in order)
    return KernelProfile(kernels=out, run_us=float(np.median([e - s for s, e in spans])), runs=len(spans),
                         providers=tuple(providers))


@dataclass(frozen=True)
class RatioMeasurement:
    """Latency of models timed in the same interleaved rounds; ``ratios[i]``: model i relative to model 0."""

    median_s: tuple[float, ...]
    ratios: tuple[float, ...]
    round_ratios: tuple[tuple[float, ...], ...]
    rounds: int


def interleaved_ratios(models: Sequence[bytes], *, backend: str = "ort-cpu", batch: int = 1,
                       threads: int | None = None, rounds: int = 7, min_iters: int = 3, round_seconds: float = 0.3,
                       warmup_s: float = 0.5, seed: int = 0,
                       input_shapes: Mapping[str, Sequence[int]] | None = None) -> RatioMeasurement:
    """Time serialized models in interleaved rounds (module docstring); each model runs at least ``min_iters`` calls
    and ``round_seconds`` per round, after ``warmup_s`` seconds of warm-up (``input_shapes``: the sizes of inputs
    with dynamic dims besides the batch, as ``--input-shape`` gives them)."""
    check_latency_backend(backend)
    if not models or rounds < 1 or min_iters < 1:
        raise UserInputError("give at least one model and positive rounds and iterations")
    calls = []
    for model in models:
        session, _ = make_session(model, backend, threads)
        feeds = make_feeds(session, batch, seed=seed, input_shapes=input_shapes)
        calls.append(lambda session=session, feeds=feeds: session.run(None, feeds))
    for call in calls:
        time_calls(call, min_duration_s=warmup_s, min_iters=1)
    medians = np.zeros((rounds, len(calls)))
    samples: list[list[np.ndarray]] = [[] for _ in calls]
    for r in range(rounds):
        for i, call in enumerate(calls):
            times = time_calls(call, min_duration_s=round_seconds, min_iters=min_iters)
            samples[i].append(times)
            medians[r, i] = float(np.median(times))
    per_round = medians / medians[:, :1]
    return RatioMeasurement(median_s=tuple(float(np.median(np.concatenate(s))) for s in samples),
                            ratios=tuple(float(v) for v in np.median(per_round, axis=0)),
                            round_ratios=tuple(tuple(float(v) for v in row) for row in per_round.T), rounds=rounds)

"""Deployment targets and TensorRT engines (onnxruntime sessions live in :mod:`pipeline.model.runtime`).

* ``BACKENDS`` / ``PRECISIONS``: the targets ``bench`` and the planner know; ``ROUND_TO_DEFAULTS``: the planner's
  channel multiple per target, with its evidence.
* TensorRT (the ``[trt]`` extra: ``tensorrt`` 10.x and ``cuda-python``) is imported lazily, only inside
  ``build_engine`` / ``TrtRunner``, so this module imports on CPU-only machines. The engine is built from the ONNX
  file with an explicit optimisation profile (min = opt = max = the benchmarked shape), FP32/FP16/INT8 (INT8
  calibrated with an entropy calibrator on user data), an on-disk timing cache and a saved engine. The runner uses a
  CUDA stream, CUDA events around the enqueue (GPU compute time) and around the copies (H2D, D2H), and replays the
  enqueue through a CUDA graph when capture succeeds.
* ``time_calls``: the timing loop shared by every backend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graph_ops.errors import UserInputError
from pipeline.model.runtime import ORT_BACKENDS

logger = logging.getLogger(__name__)

BACKENDS = (*ORT_BACKENDS, "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")

# Default channel multiple for the planner, per (backend, precision). Where each value comes from:
# - ort-cpu fp32: measured (benchmarks/round_to.py): widths that are not multiples of 4 cost 25-35 % more per MAC,
#   multiples of 8 were no better than multiples of 4; 8 is kept so that a CPU-pruned model stays aligned for GPUs.
# - GPU fp32/fp16 (ort-cuda, ort-trt, tensorrt): 8, NVIDIA's Tensor-Core alignment for FP16 (TensorRT issue #3876,
#   "channel % 8 == 0" formats); not measured here (no GPU was available when this table was written).
# - int8 on TensorRT: 32, NVIDIA's INT8 Tensor-Core alignment (TensorRT issue #1310); not measured here.
ROUND_TO_DEFAULTS: dict[tuple[str, str], int] = {
    ("ort-cpu", "fp32"): 8,
    ("ort-cuda", "fp32"): 8,
    ("ort-cuda", "fp16"): 8,
    ("ort-trt", "fp32"): 8,
    ("ort-trt", "fp16"): 8,
    ("ort-trt", "int8"): 32,
    ("tensorrt", "fp32"): 8,
    ("tensorrt", "fp16"): 8,
    ("tensorrt", "int8"): 32,
}


def default_round_to(backend: str = "ort-cpu", precision: str = "fp32") -> int:
    """The planner's channel multiple for a deployment target (see ROUND_TO_DEFAULTS for the evidence)."""
    try:
        return ROUND_TO_DEFAULTS[(backend, precision)]
    except KeyError:
        known = ", ".join(f"{b}/{p}" for b, p in ROUND_TO_DEFAULTS)
        raise UserInputError(f"no channel-multiple default for {backend}/{precision}; known targets: {known}; "
                             "or pass --round-to N") from None


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is known, else raise a UserInputError listing the choices."""
    if backend not in BACKENDS:
        raise UserInputError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    return backend


# ----------------------------------------------------------------------------------------------- TensorRT (lazy)


def _import_tensorrt() -> tuple[Any, Any]:
    """Import tensorrt and the CUDA runtime bindings, or raise a UserInputError naming the extra to install."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise UserInputError("backend tensorrt needs the TensorRT Python package: pip install 'diprune[trt]'") from err
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as err:
            raise UserInputError("backend tensorrt needs cuda-python: pip install cuda-python") from err
    return trt, cudart


def _cuda(result: tuple[Any, ...]) -> Any:
    """Check a cuda-python call's ``(error, *values)`` result; return the value(s)."""
    err, *values = result
    if int(err) != 0:
        raise UserInputError(f"CUDA runtime call failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


def _entropy_calibrator(trt: Any, cudart: Any, batches: Sequence[Mapping[str, np.ndarray]], cache: Path) -> Any:
    """An ``IInt8EntropyCalibrator2`` that feeds ``batches`` (host arrays per input name) from device buffers."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = list(batches)
            self.position = 0
            first = self.batches[0]
            self.device = {name: _cuda(cudart.cudaMalloc(arr.nbytes)) for name, arr in first.items()}

        def get_batch_size(self) -> int:
            return 1  # explicit-batch networks take the batch from the calibration profile's shapes (as Polygraphy)

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.position >= len(self.batches):
                return None
            batch = self.batches[self.position]
            self.position += 1
            for name in names:
                host = np.ascontiguousarray(batch[name])
                _cuda(cudart.cudaMemcpy(self.device[name], host.ctypes.data, host.nbytes,
                                        cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            return [int(self.device[name]) for name in names]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            cache.write_bytes(bytes(data))

    return EntropyCalibrator()


def build_engine(onnx_path: str | Path, shapes: Mapping[str, Sequence[int]], engine_path: str | Path, *,
                 precision: str = "fp32", timing_cache: str | Path | None = None,
                 calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
                 workspace_bytes: int = 1 << 30) -> Path:
    """Build and save a TensorRT engine from an ONNX file (TensorRT 10 API).

    Args:
        onnx_path: the model.
        shapes: input name -> the shape to build for (used as min = opt = max of the one profile).
        engine_path: where the serialized engine is written.
        precision: ``fp32``, ``fp16`` or ``int8`` (FP16 is allowed as fallback). A model with Q/DQ nodes (the
            ``tensorrt`` INT8 recipe) is built with explicit quantization, its own scales; otherwise INT8 uses
            implicit quantization with an entropy calibrator on ``calibration`` (deprecated since TensorRT 10.1 in
            favour of explicit Q/DQ, still supported).
        timing_cache: file that holds the builder's timing cache (read if present, written after the build).
        calibration: INT8 calibration batches (input name -> array with the build batch size).
        workspace_bytes: builder workspace pool limit.

    Returns:
        ``engine_path``.
    """
    if precision not in PRECISIONS:
        raise UserInputError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    trt, cudart = _import_tensorrt()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserInputError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, shape in shapes.items():
        profile.set_shape(name, tuple(shape), tuple(shape), tuple(shape))
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    explicit = any(network.get_layer(i).type == trt.LayerType.QUANTIZE for i in range(network.num_layers))
    if precision == "int8":
        if calibration is None and not explicit:
            raise UserInputError("INT8 needs calibration data (labelled or not), or a Q/DQ model (prune --backend "
                                 "tensorrt --quantize int8): pass calibration batches")
        config.set_flag(trt.BuilderFlag.INT8)
        if not explicit:  # implicit quantization: TensorRT calibrates the ranges itself
            config.set_calibration_profile(profile)
            config.int8_calibrator = _entropy_calibrator(trt, cudart, list(calibration),
                                                         Path(engine_path).with_suffix(".calib"))
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserInputError(f"TensorRT failed to build an engine for {onnx_path} ({precision}); see its log")
    Path(engine_path).write_bytes(bytes(serialized))
    if cache_path is not None:
        cache_path.write_bytes(bytes(cache.serialize()))  # the attached cache was updated by the build
    logger.info("built %s engine %s", precision, engine_path)
    return Path(engine_path)


class TrtRunner:
    """Run a saved TensorRT engine on fixed inputs with a CUDA stream, events and (when possible) a CUDA graph.

    ``__call__`` does one timed execution: H2D copies, the enqueue (or graph launch), D2H copies, then a stream
    synchronize; it appends the event-measured H2D, GPU compute and D2H times (seconds) to ``h2d_s``,
    ``gpu_compute_s`` and ``d2h_s``. ``outputs`` holds the host outputs of the last call.
    """

    def __init__(self, engine_path: str | Path, feeds: Mapping[str, np.ndarray], *, use_cuda_graph: bool = True):
        """Deserialize the engine, allocate device buffers for ``feeds`` and the outputs, and try graph capture."""
        self.trt, self.cudart = _import_tensorrt()
        trt, cudart = self.trt, self.cudart
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        self.stream = _cuda(cudart.cudaStreamCreate())
        self.events = [_cuda(cudart.cudaEventCreate()) for _ in range(4)]
        self.inputs = {name: np.ascontiguousarray(arr) for name, arr in feeds.items()}
        for name, arr in self.inputs.items():
            self.context.set_input_shape(name, arr.shape)
        self.outputs: dict[str, np.ndarray] = {}
        self.device: dict[str, int] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
                self.outputs[name] = np.empty(tuple(self.context.get_tensor_shape(name)), dtype)
            host = self.inputs.get(name, self.outputs.get(name))
            self.device[name] = _cuda(cudart.cudaMalloc(max(host.nbytes, 1)))
            self.context.set_tensor_address(name, int(self.device[name]))
        self.h2d_s: list[float] = []
        self.gpu_compute_s: list[float] = []
        self.d2h_s: list[float] = []
        self.graph_exec = self._capture() if use_cuda_graph else None

    def _capture(self) -> Any:
        """Capture the enqueue into a CUDA graph (after one plain enqueue, as TensorRT requires); None on failure."""
        cudart = self.cudart
        self.context.execute_async_v3(self.stream)
        _cuda(cudart.cudaStreamSynchronize(self.stream))
        try:
            _cuda(cudart.cudaStreamBeginCapture(self.stream,
                                                cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
            self.context.execute_async_v3(self.stream)
            graph = _cuda(cudart.cudaStreamEndCapture(self.stream))
            return _cuda(cudart.cudaGraphInstantiate(graph, 0))
        except UserInputError as err:
            logger.info("CUDA graph capture failed (%s); timing plain enqueues", err)
            return None

    def _copy(self, kind: str) -> None:
        cudart = self.cudart
        if kind == "h2d":
            for name, host in self.inputs.items():
                _cuda(cudart.cudaMemcpyAsync(self.device[name], host.ctypes.data, host.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        else:
            for name, host in self.outputs.items():
                _cuda(cudart.cudaMemcpyAsync(host.ctypes.data, self.device[name], host.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def __call__(self) -> None:
        """One execution with event timing; see the class docstring."""
        cudart, ev = self.cudart, self.events
        _cuda(cudart.cudaEventRecord(ev[0], self.stream))
        self._copy("h2d")
        _cuda(cudart.cudaEventRecord(ev[1], self.stream))
        if self.graph_exec is not None:
            _cuda(cudart.cudaGraphLaunch(self.graph_exec, self.stream))
        else:
            self.context.execute_async_v3(self.stream)
        _cuda(cudart.cudaEventRecord(ev[2], self.stream))
        self._copy("d2h")
        _cuda(cudart.cudaEventRecord(ev[3], self.stream))
        _cuda(cudart.cudaStreamSynchronize(self.stream))
        for store, (a, b) in zip((self.h2d_s, self.gpu_compute_s, self.d2h_s), ((0, 1), (1, 2), (2, 3)), strict=True):
            store.append(_cuda(cudart.cudaEventElapsedTime(ev[a], ev[b])) / 1e3)

    def clear_times(self) -> None:
        """Forget the recorded times (after warm-up)."""
        self.h2d_s.clear()
        self.gpu_compute_s.clear()
        self.d2h_s.clear()


def time_calls(func: Any, *, min_duration_s: float, min_iters: int) -> np.ndarray:
    """Call ``func()`` until both ``min_duration_s`` and ``min_iters`` are reached; return per-call seconds."""
    times: list[float] = []
    clock = time.perf_counter
    start = clock()
    while len(times) < min_iters or clock() - start < min_duration_s:
        t0 = clock()
        func()
        times.append(clock() - t0)
    return np.asarray(times, dtype=np.float64)

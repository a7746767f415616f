"""The onnxruntime side of every stage: sessions, input specs, label checks, fixed feeds and the one batch stream.

* :func:`make_session` builds a session for one backend and returns the execution providers that are *really*
  active (``session.get_providers()``): onnxruntime silently falls back to the CPU provider when CUDA or TensorRT
  cannot be loaded, so a run that asked for ``ort-cuda`` but runs on the CPU is refused with a clear error.
  :func:`open_session` adds ``auto`` (the CUDA EP when it is really active, else the CPU EP), which calibration,
  evaluation and recovery use.
* :func:`model_input_specs` / :func:`session_input_specs`, :func:`output_classes`, :func:`check_labels`: what data
  must look like to fit a model.
* :func:`feed_batches` binds a :class:`pipeline.data.datasets.Dataset` to the model's inputs and checks every batch;
  :func:`run` calls onnxruntime with its errors turned into :class:`~pipeline.errors.CalibrationError`, in calls of
  at most :func:`samples_per_run` samples (a batch of a model with large activations is cut into consecutive slices
  whose per-sample outputs are concatenated: onnxruntime computes every sample independently, so the values are
  those of one call, while its memory holds the activations of a slice, not of the whole batch);
  :func:`stream` is the one batch loop of calibration and evaluation (batch ``i + 1`` runs in onnxruntime on a worker
  thread, which releases the GIL, while the caller folds batch ``i``; at most two batches of outputs are alive;
  order is kept, so the same inputs give the same results). Recovery's level-by-level sweep
  (:mod:`pipeline.recovery.sweep`) uses :func:`feed_batches` and :func:`run` on its sub-models.
* :func:`make_feeds` gives fixed inputs for one batch size (seeded random, or the first samples of an .npz) for the
  latency benchmark.

TensorRT lives in :mod:`pipeline.deployment.engines`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from graph_ops.proto import declared_shapes
from pipeline.data.datasets import validate_batch
from pipeline.errors import CalibrationError, PruneError, UserInputError

logger = logging.getLogger(__name__)

ORT_BACKENDS: dict[str, tuple[str, ...]] = {
    "ort-cpu": ("CPUExecutionProvider",),
    "ort-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "ort-trt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
STREAM_BACKENDS = ("auto", "ort-cpu", "ort-cuda")
"""Backends of calibration, evaluation and recovery (``auto``: CUDA when really active, else CPU)."""

InputSpecs = Mapping[str, tuple[tuple[int | None, ...], np.dtype]]
ExtraFeeds = Callable[[int, Mapping[str, np.ndarray], "np.ndarray | None"], Mapping[str, np.ndarray]]

RUN_BYTES = 128 << 20
"""About how many bytes of activations one onnxruntime call of a stream may hold (:func:`samples_per_run`)."""
LIVE_TENSORS = 4
"""Activations alive at once at the widest point of a network (its input, its output, a residual, a layout copy):
the estimate of one sample's peak activation memory is this many times its widest activation."""


def make_session(model: str | Path | bytes, backend: str = "ort-cpu", intra_op_threads: int | None = None,
                 inter_op_threads: int | None = None, *, short_lived: bool = False,
                 memory_pattern: bool = True,
                 profile_prefix: str | None = None) -> tuple[ort.InferenceSession, tuple[str, ...]]:
    """Create an onnxruntime session for ``backend`` and check that the wanted provider is really active.

    Args:
        model: path to an .onnx file, or the serialized model bytes.
        backend: ``ort-cpu``, ``ort-cuda`` or ``ort-trt``.
        intra_op_threads: onnxruntime intra-op threads (None: onnxruntime's default, one per physical core).
        inter_op_threads: onnxruntime inter-op threads (None: default).
        short_lived: one of many sessions that each run a few batches (recovery's sweep steps): they share one CPU
            memory arena registered in onnxruntime's environment (:func:`shared_cpu_arena`), so a new session
            reuses memory that earlier ones already touched (its own arena would fault fresh pages in, and its
            memory pattern needs two runs to settle: measured 2-4x slower over a ResNet-50 sweep), use no memory
            pattern, and their idle pool threads do not spin (which would take the cores from the other model's
            session of the same step).
        memory_pattern: onnxruntime's memory pattern (one pre-planned block for all intermediate tensors); the
            benchmarks keep onnxruntime's default (on), the pipeline's streams turn it off (measured on ResNet-50
            at batch 64: calibration peak 1.5 instead of 2.1 GB, same speed).
        profile_prefix: turn onnxruntime's profiler on; ``session.end_profiling()`` then writes the per-kernel
            trace to a JSON file whose name starts with this prefix (the latency model reads it).

    Returns:
        The session and the providers it actually uses, in priority order.

    Raises:
        UserInputError: unknown backend, unreadable model, or the backend's provider is not active here.
    """
    if backend not in ORT_BACKENDS:
        raise UserInputError(f"backend '{backend}' is not an onnxruntime backend; choose one of "
                             f"{', '.join(ORT_BACKENDS)}")
    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads is not None:
        options.inter_op_num_threads = int(inter_op_threads)
    options.enable_mem_pattern = memory_pattern and not short_lived
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if short_lived:
        shared_cpu_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    wanted = ORT_BACKENDS[backend]
    source = model if isinstance(model, bytes) else str(model)
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise UserInputError(f"model file not found: {model}")
    try:
        with warnings.catch_warnings():  # "provider not available" is reported below, as an error
            warnings.simplefilter("ignore", UserWarning)
            session = ort.InferenceSession(source, options, providers=list(wanted))
    except Exception as err:  # onnxruntime raises its own unrelated exception types
        raise UserInputError(f"onnxruntime cannot load {'<bytes>' if isinstance(model, bytes) else model} "
                             f"for {backend}: {err}") from err
    active = tuple(session.get_providers())
    if wanted[0] not in active:
        raise UserInputError(
            f"backend {backend} asked for {wanted[0]} but onnxruntime runs on {', '.join(active)} "
            f"(available here: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu with a "
            f"matching CUDA/TensorRT, or use --backend ort-cpu")
    return session, active


@functools.cache
def shared_cpu_arena() -> None:
    """Register one CPU arena allocator in onnxruntime's (process-wide) environment, once; sessions opt in with the
    ``session.use_env_allocators`` config entry (``make_session(..., short_lived=True)``)."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # grow by what is asked, not 2x


def open_session(model: bytes | str | os.PathLike[str], backend: str = "auto",
                 intra_op_threads: int | None = None, *, short_lived: bool = False) -> ort.InferenceSession:
    """A session for calibration, evaluation or recovery (no memory pattern); ``auto`` uses the CUDA EP only when it
    is really active (``short_lived``: see :func:`make_session`)."""
    if backend not in STREAM_BACKENDS:
        raise UserInputError(f"unknown backend '{backend}' for calibration/evaluation/recovery; choose one of "
                             f"{', '.join(STREAM_BACKENDS)}")
    if backend == "auto":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            try:
                return make_session(model, "ort-cuda", intra_op_threads=intra_op_threads, short_lived=short_lived,
                                    memory_pattern=False)[0]
            except PruneError as err:
                logger.info("CUDA execution provider not usable (%s); running on CPU", err)
        backend = "ort-cpu"
    return make_session(model, backend, intra_op_threads=intra_op_threads, short_lived=short_lived,
                        memory_pattern=False)[0]


def model_input_specs(model: onnx.ModelProto) -> dict[str, tuple[tuple[int | None, ...], np.dtype]]:
    """Real (non-initializer) inputs of a model: name -> (shape with None for dynamic dims, numpy dtype)."""
    weights = {init.name for init in model.graph.initializer}
    specs = {}
    for vi in model.graph.input:
        if vi.name in weights:
            continue
        ttype = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim)
        specs[vi.name] = (shape, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)))
    return specs


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
              "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


def session_input_specs(session: Any) -> list[tuple[str, list[Any], type]]:
    """A session's inputs: ``(name, shape as onnxruntime reports it, numpy dtype)``."""
    specs = []
    for arg in session.get_inputs():
        if arg.type not in _ORT_TYPES:
            raise UserInputError(f"input {arg.name} has unsupported type {arg.type}")
        specs.append((arg.name, list(arg.shape), _ORT_TYPES[arg.type]))
    return specs


def output_classes(model: onnx.ModelProto) -> int | None:
    """K when the model's first output is ``(N, K)`` with a static K (class logits), else None."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value > 0:
        return int(dims[1].dim_value)
    return None


def check_labels(labels: Any, n: int, num_classes: int) -> np.ndarray:
    """Validate one batch of labels; returns them as int64 (n,)."""
    array = np.asarray(labels)
    if array.shape != (n,):
        raise CalibrationError(f"labels of a batch have shape {array.shape}, expected ({n},) (one per sample)")
    if array.dtype.kind not in "iu":
        raise CalibrationError(f"labels must be integer class ids, got dtype {array.dtype}")
    if n and array.min() < 0:
        raise CalibrationError(f"label {int(array.min())} is negative; labels are class ids 0..K-1")
    if n and array.max() >= num_classes:
        raise CalibrationError(f"label {int(array.max())} is out of range: the model has {num_classes} classes "
                               f"(labels must be 0..{num_classes - 1}); is this the right dataset for this model?")
    return array.astype(np.int64)


def fixed_batch(specs: InputSpecs, batch_size: int) -> int:
    """The batch size a model is really fed: the static batch its inputs all share (e.g. prepared with
    ``--input-shape images:1x3x640x640``), else ``batch_size``. Sharding (:mod:`pipeline.data.shards`) uses it too."""
    static = {shape[0] if shape else None for shape, _ in specs.values()}
    if len(static) == 1 and isinstance(next(iter(static)), int):
        return int(next(iter(static)))
    return batch_size


def feed_batches(dataset: Any, specs: InputSpecs,
                 batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    """The dataset's ``(feeds, labels)`` batches, bound to the model's input names and checked against ``specs``.

    A model whose inputs all have the same static batch (e.g. prepared with ``--input-shape images:1x3x640x640``)
    gets batches of exactly that size, whatever ``batch_size`` says.
    """
    if dataset is None:
        raise UserInputError("this stage needs data: give a dataset (e.g. --data mnist or an .npz file)")
    if batch_size < 1:
        raise UserInputError(f"batch size must be positive, got {batch_size}")
    batch_size = fixed_batch(specs, batch_size)
    bound = dataset.bind(list(specs))
    for feeds, labels in bound.batches(batch_size):
        validate_batch(feeds, specs, f"dataset '{bound.name}'")
        yield dict(feeds), labels


def samples_per_run(model: onnx.ModelProto, batch_size: int, budget: int = RUN_BYTES,
                    shapes: Mapping[str, tuple[int | None, ...]] | None = None) -> int:
    """Samples per onnxruntime call for batches of ``batch_size``: the whole batch, or equal slices of it small
    enough that ``LIVE_TENSORS`` x the model's widest per-sample activation (from its declared shapes, or from
    ``shapes``: the sizes analysis used for a model with dynamic spatial dims) fits in ``budget`` bytes (ResNet-50 at
    224 x 224: 3.2 MB per sample, so 10 of a batch of 64: 7 calls). A model whose inputs have a static batch always
    runs whole batches."""
    if static_batch(model):
        return batch_size
    return samples_for((declared_shapes(model) if shapes is None else shapes).values(), batch_size, budget)


def static_batch(model: onnx.ModelProto) -> bool:
    """True when some input of ``model`` has a static batch (such a model always runs whole batches)."""
    return any(shape and isinstance(shape[0], int) for shape, _ in model_input_specs(model).values())


def samples_for(shapes: Iterable[tuple[int | None, ...]], batch_size: int, budget: int = RUN_BYTES) -> int:
    """:func:`samples_per_run` for the tensors of these shapes (batch first; e.g. what one sub-graph of a model
    computes and reads): the whole batch, or equal slices of it within ``budget``."""
    if batch_size <= 1:
        return batch_size
    widest = 0
    for shape in shapes:
        if len(shape) >= 2 and all(isinstance(d, int) and d > 0 for d in shape[1:]):
            widest = max(widest, 4 * int(np.prod(shape[1:], dtype=np.int64)))
    most = max(1, budget // max(LIVE_TENSORS * widest, 1))
    if most >= batch_size:
        return batch_size
    calls = -(-batch_size // most)
    return -(-batch_size // calls)


def run(session: Any, names: Sequence[str] | None, feeds: Mapping[str, np.ndarray], *, stage: str,
        finite: bool = False, per_run: int | None = None, shapes: Collection[str] = ()) -> list[np.ndarray]:
    """``session.run`` with onnxruntime's errors as CalibrationError (naming ``stage``); with ``finite``, every
    output must be free of NaN and Inf. ``per_run`` (see :func:`samples_per_run`): at most this many samples per
    onnxruntime call; the batch is cut along axis 0 of every feed, and the outputs of the slices are concatenated
    along axis 0 (every output must then lead with the slice's samples; a model whose outputs do not runs the
    whole batch in one call). ``shapes``: outputs that are ``Shape`` tensors of per-sample tensors (the batch in
    entry 0, the rest the same for every slice): sliced, their entry 0 is the whole batch's."""
    feeds = dict(feeds)
    rows = {len(v) if np.ndim(v) else -1 for v in feeds.values()}
    outputs = None
    if per_run is not None and len(rows) == 1 and next(iter(rows)) > per_run and session not in _NOT_PER_SAMPLE:
        outputs = _run_sliced(session, names, feeds, next(iter(rows)), per_run, stage, shapes)
        if outputs is None:
            _NOT_PER_SAMPLE.add(session)  # found once: later batches run whole without trying slices again
    if outputs is None:
        outputs = _call(session, names, feeds, stage)
    return _check_finite(session, names, outputs, stage) if finite else outputs


_NOT_PER_SAMPLE: weakref.WeakSet[Any] = weakref.WeakSet()
"""Sessions with an output that does not lead with the batch's samples: :func:`run` gives them whole batches."""


def _call(session: Any, names: Sequence[str] | None, feeds: Mapping[str, np.ndarray], stage: str) -> list[np.ndarray]:
    """One ``session.run``, onnxruntime's errors as CalibrationError."""
    try:
        return session.run(None if names is None else list(names), dict(feeds))
    except Exception as err:  # onnxruntime raises its own unrelated exception types
        raise CalibrationError(f"onnxruntime failed during {stage}: {err}") from err


def _run_sliced(session: Any, names: Sequence[str] | None, feeds: dict[str, np.ndarray], n: int, per_run: int,
                stage: str, shapes: Collection[str] = ()) -> list[np.ndarray] | None:
    """The outputs of ``feeds`` run in slices of ``per_run`` samples, written into whole-batch arrays (allocated
    from the first slice's shapes; a ``shapes`` output gets ``n`` in entry 0); None when an output does not lead
    with the slice's samples (not per sample)."""
    is_shape = [name in shapes for name in (names or [o.name for o in session.get_outputs()])]
    whole: list[np.ndarray] = []
    for start in range(0, n, per_run):
        stop = min(start + per_run, n)
        outs = _call(session, names, {k: v[start:stop] for k, v in feeds.items()}, stage)
        for o, w, shape in zip(outs, whole or outs, is_shape, strict=True):
            if shape:
                ok = np.ndim(o) == 1 and len(o) >= 1 and int(o[0]) == stop - start and (
                    not whole or np.array_equal(o[1:], w[1:]))
            else:
                ok = np.ndim(o) > 0 and len(o) == stop - start and (not whole or o.shape[1:] == w.shape[1:])
            if not ok:
                return None
        if not whole:
            whole = [o.copy() if shape else np.empty((n, *o.shape[1:]), o.dtype)
                     for o, shape in zip(outs, is_shape, strict=True)]
            for target, shape in zip(whole, is_shape, strict=True):
                if shape:
                    target[0] = n
        for target, part, shape in zip(whole, outs, is_shape, strict=True):
            if not shape:
                target[start:stop] = part
        del outs
    return whole


def _check_finite(session: Any, names: Sequence[str] | None, outputs: list[np.ndarray],
                  stage: str) -> list[np.ndarray]:
    for name, value in zip(names or [o.name for o in session.get_outputs()], outputs, strict=True):
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise CalibrationError(f"tensor '{name}' has NaN or Inf values during {stage} although the inputs "
                                   f"are finite; check the input scaling (--scale/--mean/--std)")
    return outputs


@dataclass(frozen=True)
class Batch:
    """One batch of a :func:`stream`: its position, inputs, labels (None when unlabelled) and the outputs asked for."""

    index: int
    start: int
    feeds: Mapping[str, np.ndarray]
    labels: np.ndarray | None
    outputs: list[np.ndarray]

    @property
    def size(self) -> int:
        """Samples in the batch."""
        return next(iter(self.feeds.values())).shape[0]


def stream(session: Any, dataset: Any, names: Sequence[str] | None, specs: InputSpecs, *, batch_size: int,
           stage: str, progress: bool = False, finite: bool = False, per_run: int | None = None,
           shapes: Collection[str] = (), extra: ExtraFeeds | None = None) -> Iterator[Batch]:
    """Run ``session`` over every batch of ``dataset`` (see the module docstring) and yield :class:`Batch` es in order.

    Args:
        session: an onnxruntime session (:func:`open_session`).
        dataset: a :class:`pipeline.data.datasets.Dataset`.
        names: outputs to fetch (None: all).
        specs: the model's inputs (:func:`model_input_specs`); every batch is checked against them.
        batch_size: samples per onnxruntime call.
        stage: what the stream is for (progress bar label, error messages).
        progress: a tqdm bar on stderr.
        finite: refuse NaN / Inf outputs.
        per_run: at most this many samples per onnxruntime call (:func:`run`); ``shapes`` as there.
        extra: ``(start, feeds, labels) -> more feeds`` of every batch (e.g. positions to gather inside the graph),
            called in order, before the batch runs; ``start`` is the batch's first sample in ``dataset``.

    Raises:
        CalibrationError: the dataset yields no samples, a batch does not fit the model, onnxruntime fails.
    """
    from tqdm import tqdm

    batches = feed_batches(dataset, specs, batch_size)
    total = getattr(dataset, "num_samples", None)
    start = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"diprune-{stage}") as pool, \
            tqdm(total=total, desc=stage, unit="sample", file=sys.stderr, disable=not progress) as bar:
        pending: tuple[int, dict[str, np.ndarray], np.ndarray | None, Future] | None = None
        submitted = 0
        for index, (feeds, labels) in enumerate(batches):
            fed = feeds if extra is None else {**feeds, **extra(submitted, feeds, labels)}
            submitted += next(iter(feeds.values())).shape[0]
            future = pool.submit(run, session, names, fed, stage=stage, finite=finite, per_run=per_run,
                                 shapes=shapes)
            if pending is not None:
                batch = Batch(pending[0], start, pending[1], pending[2], pending[3].result())
                start += batch.size
                bar.update(batch.size)
                yield batch
            pending = (index, feeds, labels, future)
        if pending is not None:
            batch = Batch(pending[0], start, pending[1], pending[2], pending[3].result())
            start += batch.size
            bar.update(batch.size)
            yield batch
    if start == 0:
        raise CalibrationError(f"the {stage} dataset yielded no samples")


# ----------------------------------------------------------------------------------------------- fixed feeds


def _resolve_shape(name: str, shape: list[Any], batch: int, model: str,
                   fixed: Sequence[int] | None = None) -> tuple[int, ...]:
    if fixed is not None:
        if len(fixed) != len(shape) or any(isinstance(d, int) and d != f for d, f in zip(shape[1:], fixed[1:],
                                                                                         strict=False)):
            raise UserInputError(f"{model}: --input-shape {name}:{'x'.join(map(str, fixed))} does not fit the "
                                 f"input's shape {shape}")
        shape = [shape[0], *fixed[1:]]
    dims = [batch if i == 0 and not isinstance(d, int) else d for i, d in enumerate(shape)]
    if dims and dims[0] != batch:
        raise UserInputError(f"{model}: input {name} has a fixed batch of {dims[0]}, cannot run batch {batch}; "
                             f"export the model with a dynamic batch dimension")
    if any(not isinstance(d, int) for d in dims):
        raise UserInputError(f"{model}: input {name} has symbolic dimensions {shape} besides the batch; "
                             f"give them with --input-shape {name}:1x...")
    return tuple(int(d) for d in dims)


def _data_array(data: Mapping[str, np.ndarray], name: str, single: bool) -> np.ndarray:
    if name in data:
        return data[name]
    if single and "x" in data:
        return data["x"]
    if single and len(data) == 1:
        return next(iter(data.values()))
    raise UserInputError(f"data file has no array named '{name}' (arrays: {', '.join(sorted(data))})")


def make_feeds(session: Any, batch: int, *, seed: int = 0, data: Mapping[str, np.ndarray] | None = None,
               model: str = "model", input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Fixed inputs for one batch: seeded standard-normal (integers: 0..9), or the first ``batch`` data samples.

    ``input_shapes`` gives the dims of inputs with symbolic sizes (the batch always comes from ``batch``).

    Data samples are repeated when there are fewer than ``batch``; uint8 data for a float input is scaled by 1/255
    and a missing channel axis (N,H,W for N,1,H,W) is inserted.
    """
    specs = session_input_specs(session)
    rng = np.random.default_rng(seed)
    feeds = {}
    shapes = dict(input_shapes or {})
    if "" in shapes and len(specs) == 1:  # --input-shape DIMS without a name: the single input
        if specs[0][0] in shapes:
            raise UserInputError(f"--input-shape gives input '{specs[0][0]}' twice (with and without its name)")
        shapes[specs[0][0]] = shapes.pop("")
    for name, shape, dtype in specs:
        dims = _resolve_shape(name, shape, batch, model, shapes.get(name))
        if data is None:
            sample = rng.standard_normal(dims) if np.issubdtype(dtype, np.floating) else rng.integers(0, 10, dims)
            feeds[name] = np.asarray(sample, dtype=dtype)
            continue
        arr = np.asarray(_data_array(data, name, len(specs) == 1))
        if not arr.ndim or not len(arr) or arr.dtype.kind not in "biuf":
            raise UserInputError(f"{model}: data for input {name} must be a non-empty numeric array with a sample "
                                 f"axis, got dtype {arr.dtype} and shape {arr.shape}")
        if arr.ndim == len(dims) - 1:
            arr = arr[:, None]
        if arr.dtype == np.uint8 and np.issubdtype(dtype, np.floating):
            arr = arr.astype(np.float32) / 255.0
        arr = np.resize(arr, (batch, *arr.shape[1:])).astype(dtype)
        if arr.shape != dims:
            raise UserInputError(f"{model}: data for input {name} has sample shape {arr.shape[1:]}, "
                                 f"the model wants {dims[1:]}")
        feeds[name] = arr
    return feeds


def load_npz(data: str | Path | Mapping[str, np.ndarray] | None) -> Mapping[str, np.ndarray] | None:
    """The arrays of an .npz file (a mapping or None passes through), with clear errors."""
    if data is None or isinstance(data, Mapping):
        return data
    path = Path(data)
    if not path.is_file():
        raise UserInputError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as err:  # zipfile, zlib, pickle and value errors all mean a corrupt or foreign file
        raise UserInputError(f"{path} is not a readable .npz file (corrupt, truncated or holding Python "
                             f"objects): {err}") from err

"""Streaming calibration: run a model over labelled data and accumulate per-probe sufficient statistics.

For every probe tensor ``A`` (shape ``(N, C, H, W)``, or ``(N, C)``) and every batch, the pooled feature matrix
``X`` (``N x d``, float64, ``d = C * cells``) is formed and folded into :class:`pipeline.stats.ProbeStats` (class
counts, sums, per-class sums, the uncentred Gram matrix ``X^T X``, and per-channel zero counts / absolute sums of the
raw activations). Activations are dropped after each batch, so memory is bounded by the statistics (``O(d^2)`` per
probe), never by the number of samples.

Pooling (``POOLINGS``): ``gap`` averages over all spatial positions (``cells = 1``); ``avgK`` is K x K adaptive
average pooling with the bin edges of ``torch.nn.AdaptiveAvgPool2d`` (bin ``i`` of an axis of length ``L`` covers
``[floor(i L / K), ceil((i + 1) L / K))``), giving ``cells = K * K`` features per channel laid out channel-major:
feature ``c * cells + i * K + j`` is bin ``(i, j)`` of channel ``c``. Two-dimensional probes ``(N, C)`` have
``cells = 1`` under every pooling. Means are accumulated in float64.

Preconditions checked per batch (each failure is a :class:`~pipeline.errors.CalibrationError` naming the tensor):
inputs match the model's input names, ranks, static dimensions and dtypes, and are finite; labels are present (when
required), integer, non-negative and below the number of classes of a ``(N, K)`` output; every pooled activation is
finite (a NaN or Inf anywhere in a bin makes its mean non-finite, so checking the pooled features is exhaustive).
After the pass: at least two classes are present (when labels are required); a WARNING is logged when there are
fewer than ``10 * d`` samples for the widest probe or fewer than 5 samples in a class.

The statistics are computed on ``canonicalize(load_model(path))`` - the graph that analysis and surgery use - and
``model_sha256`` is the sha256 of the file given. The file is never modified. Batches are folded in order (batch
``i + 1`` runs in onnxruntime on a worker thread while batch ``i`` is folded; at most two batches are alive), so the
same inputs give identical statistics.

Cost: besides inference, each probe costs three passes over its activation per batch (a float64 sum over the
contiguous spatial axis, which gives the GAP features; a zero count; a min that detects non-negative tensors, whose
absolute sums then equal the plain sums), plus ``O(n d^2)`` for the Gram update.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from graph_ops.canonicalize import canonicalize
from graph_ops.channels import analyze
from graph_ops.groups import ChannelGroupIndex
from graph_ops.io import load_model, sha256_file
from graph_ops.probes import expose_tensors
from pipeline.data import validate_batch
from pipeline.errors import CalibrationError, PruneError, UserInputError
from pipeline.stats import CalibrationStats, ChannelSummary, ProbeStats, channel_summaries

logger = logging.getLogger(__name__)

POOLINGS: dict[str, int] = {"gap": 1, "avg2": 2, "avg4": 4}
"""Pooling name -> K of the K x K adaptive average pooling (``gap`` = 1 x 1)."""

BACKENDS = ("auto", "ort-cpu", "ort-cuda")
MIN_SAMPLES_PER_DIM = 10
MIN_SAMPLES_PER_CLASS = 5

def _bins(length: int, k: int) -> list[tuple[int, int]]:
    """Adaptive pooling bin edges along one axis (as torch's AdaptiveAvgPool)."""
    return [((i * length) // k, -((-(i + 1) * length) // k)) for i in range(k)]


def pool_features(activation: np.ndarray, k: int, name: str = "tensor") -> tuple[np.ndarray, int]:
    """Pool an activation ``(N, C, ...)`` to float64 features ``(N, C * cells)``, channel-major.

    Args:
        activation: the probe tensor of one batch.
        k: K of the K x K adaptive average pooling (1 = global average pooling).
        name: tensor name for error messages.

    Returns:
        ``(features, cells)``.
    """
    if activation.ndim < 2:
        raise CalibrationError(f"probe '{name}' has shape {activation.shape}; expected (N, C, ...) with channels "
                               f"on axis 1")
    n, c = activation.shape[:2]
    if activation.ndim == 2:
        return activation.astype(np.float64), 1
    if k == 1:
        return activation.mean(axis=tuple(range(2, activation.ndim)), dtype=np.float64), 1
    if activation.ndim != 4:
        raise CalibrationError(f"pooling avg{k} needs 4-D (N, C, H, W) probes, but '{name}' has shape "
                               f"{activation.shape}; use pooling 'gap'")
    h, w = activation.shape[2:]
    if h % k == 0 and w % k == 0:
        blocks = activation.reshape(n, c, k, h // k, k, w // k)
        return blocks.mean(axis=(3, 5), dtype=np.float64).reshape(n, c * k * k), k * k
    out = np.empty((n, c, k, k), dtype=np.float64)
    for i, (h0, h1) in enumerate(_bins(h, k)):
        for j, (w0, w1) in enumerate(_bins(w, k)):
            out[:, :, i, j] = activation[:, :, h0:h1, w0:w1].mean(axis=(2, 3), dtype=np.float64)
    return out.reshape(n, c * k * k), k * k


def open_session(model: bytes | str | os.PathLike[str], backend: str = "auto",
                 intra_op_threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session; ``auto`` uses the CUDA EP only when it is really active, else the CPU EP."""
    from pipeline.engines import make_session

    if backend not in BACKENDS:
        raise UserInputError(f"unknown backend '{backend}' for calibration/evaluation; choose one of "
                             f"{', '.join(BACKENDS)}")
    if backend == "auto":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            try:
                return make_session(model, "ort-cuda", intra_op_threads=intra_op_threads)[0]
            except PruneError as err:
                logger.info("CUDA execution provider not usable (%s); running on CPU", err)
        backend = "ort-cpu"
    return make_session(model, backend, intra_op_threads=intra_op_threads)[0]


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


def default_probes(model: onnx.ModelProto, index: ChannelGroupIndex | None = None) -> tuple[str, ...]:
    """All probes of all prunable groups of the (canonical) model, in topological group order, without repeats."""
    index = index if index is not None else analyze(model)
    return tuple(dict.fromkeys(p for group in index.groups if group.prunable for p in group.probes))


def _num_classes(model: onnx.ModelProto, dataset: Any, require_labels: bool) -> int:
    """K of a ``(N, K)`` output, else the dataset's ``num_classes``; 1 for label-free statistics."""
    k = output_classes(model) or getattr(dataset, "num_classes", None)
    if k:
        return int(k)
    if require_labels:
        raise CalibrationError("cannot tell the number of classes: the model's first output is not (N, K) logits "
                               "and the dataset does not state num_classes")
    return 1


def _fold(probe: ProbeStats | None, activation: np.ndarray, labels: np.ndarray, k: int, num_classes: int,
          name: str, start: int) -> ProbeStats:
    """Pool one batch of a probe, check it, and fold it into the probe's statistics."""
    if activation.ndim < 2:
        raise CalibrationError(f"probe '{name}' has shape {activation.shape}; expected (N, C, ...) with channels "
                               f"on axis 1")
    sums, zeros, abs_sum = channel_summaries(activation)
    spatial = int(np.prod(activation.shape[2:], dtype=np.int64))
    if k == 1 or activation.ndim == 2:
        features, cells = sums / spatial, 1
    else:
        features, cells = pool_features(activation, k, name)
    if not np.isfinite(features).all():
        raise CalibrationError(f"activation '{name}' has NaN or Inf values (batch from sample {start}) although "
                               f"the inputs are finite; check the input scaling (--scale/--mean/--std)")
    if probe is None:
        probe = ProbeStats.empty(activation.shape[1], cells, num_classes)
    summary = ChannelSummary(zeros=zeros, abs_sum=abs_sum, elements=activation.shape[0] * spatial)
    return probe.update(features, labels, summary=summary)


def _check_amount(stats: Mapping[str, ProbeStats], require_labels: bool) -> None:
    """Error on a single class; warn when the sample counts are small for the feature dimension."""
    first = next(iter(stats.values()))
    counts = np.asarray(first.class_counts)
    present = np.flatnonzero(counts)
    if require_labels and len(present) < 2:
        raise CalibrationError(f"all {first.n} calibration samples have the same label ({int(present[0])}); "
                               f"DI/LDA/PLS need at least two classes")
    widest = max(stats, key=lambda p: stats[p].sum.shape[0])
    d = stats[widest].sum.shape[0]
    if first.n < MIN_SAMPLES_PER_DIM * d:
        logger.warning("only %d calibration samples for probe '%s' with %d features (channels x cells); about "
                       "%d (10 per feature) are needed for stable scatter matrices", first.n, widest, d,
                       MIN_SAMPLES_PER_DIM * d)
    if require_labels and counts[present].min() < MIN_SAMPLES_PER_CLASS:
        smallest = int(present[np.argmin(counts[present])])
        logger.warning("class %d has only %d calibration samples (fewer than %d per class); %d of %d classes have "
                       "none", smallest, int(counts[smallest]), MIN_SAMPLES_PER_CLASS, len(counts) - len(present),
                       len(counts))


def _labelled_batches(dataset: Any, specs: Mapping[str, Any], batch_size: int, num_classes: int,
                      require_labels: bool) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """The dataset's batches, each checked against the model inputs, with validated int64 labels."""
    for feeds, labels in dataset.batches(batch_size):
        validate_batch(feeds, specs, f"dataset '{dataset.name}'")
        n = next(iter(feeds.values())).shape[0]
        if labels is None and require_labels:
            raise CalibrationError("DI/LDA/PLS need labels; the dataset has none. Use labelled data (an .npz with a "
                                   "'y' array, or an image folder with one sub-folder per class) or a data-free "
                                   "method (l1, l2, random)")
        unlabelled = labels is None or (num_classes == 1 and not require_labels)
        yield dict(feeds), np.zeros(n, np.int64) if unlabelled else check_labels(labels, n, num_classes)


def _pipelined(session: ort.InferenceSession, names: Sequence[str],
               batches: Iterator[tuple[dict[str, np.ndarray], np.ndarray]]) -> Iterator[tuple[np.ndarray, list]]:
    """Yield ``(labels, probe outputs)`` per batch, in order; batch i+1 runs in onnxruntime (which releases the
    GIL) while the caller folds batch i into the statistics. At most two batches of activations are alive."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="diprune-calibrate") as pool:
        pending: tuple[np.ndarray, Future] | None = None
        for feeds, labels in batches:
            future = pool.submit(session.run, list(names), feeds)
            if pending is not None:
                yield pending[0], _result(pending[1])
            pending = (labels, future)
        if pending is not None:
            yield pending[0], _result(pending[1])


def _result(future: Future) -> list[np.ndarray]:
    try:
        return future.result()
    except Exception as err:  # onnxruntime raises its own unrelated exception types
        raise CalibrationError(f"onnxruntime failed while calibrating: {err}") from err


def _stream(session: ort.InferenceSession, dataset: Any, names: Sequence[str], specs: Mapping[str, Any], *, k: int,
            num_classes: int, batch_size: int, require_labels: bool, progress: bool) -> dict[str, ProbeStats]:
    """Run all batches and accumulate the statistics of every probe."""
    from tqdm import tqdm

    stats: dict[str, ProbeStats] = {}
    start = 0
    dataset = dataset.bind(list(specs))
    batches = _labelled_batches(dataset, specs, batch_size, num_classes, require_labels)
    with tqdm(total=getattr(dataset, "num_samples", None), desc="calibrate", unit="sample", file=sys.stderr,
              disable=not progress) as bar:
        for labels, outputs in _pipelined(session, names, batches):
            for name, activation in zip(names, outputs, strict=True):
                stats[name] = _fold(stats.get(name), activation, labels, k, num_classes, name, start)
            start += len(labels)
            bar.update(len(labels))
    if not stats:
        raise CalibrationError("the calibration dataset yielded no samples")
    return stats


def calibrate(model_path: str | os.PathLike[str], dataset: Any, *, probes: Sequence[str] | None = None,
              pooling: str = "gap", batch_size: int = 64, backend: str = "auto", intra_op_threads: int | None = None,
              progress: bool = True, require_labels: bool = True,
              canonical: onnx.ModelProto | None = None) -> CalibrationStats:
    """Stream a dataset through a model and return per-probe sufficient statistics.

    Args:
        model_path: the ONNX model file (never modified; its sha256 identifies the statistics).
        dataset: a :class:`pipeline.data.Dataset` (``batches(batch_size)`` yields ``(feeds, labels)``).
        probes: tensors to measure; default: all probes of all prunable groups of the canonical model.
        pooling: ``gap``, ``avg2`` or ``avg4`` (see the module docstring).
        batch_size: samples per onnxruntime call.
        backend: ``auto`` (CUDA EP when really active, else CPU), ``ort-cpu`` or ``ort-cuda``.
        intra_op_threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        progress: show a tqdm bar on stderr.
        require_labels: fail when the dataset has no labels or a single class (DI/LDA/PLS need them).
        canonical: ``canonicalize(load_model(model_path))`` when the caller already has it (saves canonicalizing
            again, seconds for large models); it must be exactly that model.

    Returns:
        The statistics, keyed by probe tensor name.

    Raises:
        CalibrationError: data that does not fit the model, NaN/Inf, missing or bad labels, one class.
        UserInputError: unreadable model, unknown probe name, pooling or backend.
    """
    if pooling not in POOLINGS:
        raise UserInputError(f"unknown pooling '{pooling}'; choose one of {', '.join(POOLINGS)}")
    if dataset is None:
        raise CalibrationError("calibration needs data: give a dataset (e.g. --data mnist or an .npz file)")
    if batch_size < 1:
        raise UserInputError(f"batch size must be positive, got {batch_size}")
    # load first: clear errors for a missing or broken file
    model = canonicalize(load_model(model_path)) if canonical is None else canonical
    sha = sha256_file(model_path)
    names = tuple(dict.fromkeys(probes)) if probes is not None else default_probes(model)
    if not names:
        raise CalibrationError(f"{model_path} has no prunable channel groups, so there is nothing to calibrate")
    session = open_session(expose_tensors(model, names).SerializeToString(), backend, intra_op_threads)
    num_classes = _num_classes(model, dataset, require_labels)
    stats = _stream(session, dataset, names, model_input_specs(model), k=POOLINGS[pooling], num_classes=num_classes,
                    batch_size=batch_size, require_labels=require_labels, progress=progress)
    _check_amount(stats, require_labels)
    logger.info("calibrated %d probes on %d samples (pooling %s)", len(stats), next(iter(stats.values())).n, pooling)
    return CalibrationStats(model_sha256=sha, dataset=str(getattr(dataset, "name", type(dataset).__name__)),
                            pooling=pooling, num_classes=num_classes, probes={p: stats[p] for p in names})

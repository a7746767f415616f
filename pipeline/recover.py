"""Training-free recovery after channel removal: statistics with onnxruntime, then weight algebra.

The registry :data:`RECOVERY` (it feeds the CLI's ``--recover``) holds the methods of methods.md 6.2:

* ``none``: plain removal (R0).
* ``bias`` (R1) and ``regress`` (R2): a channel map ``a ≈ F z + f`` of every exit consumer's full input from its
  kept channels, folded into the consumer (:mod:`graph_ops.recover`). For each consumer edit recorded by analysis
  (Conv ``W[:, c]``, ConvTranspose ``W[c]``, Gemm K rows, in ``H*W`` blocks after Flatten) whose input loses
  channels, the calibration data is streamed through the ORIGINAL model with the consumer inputs exposed and float64
  :class:`graph_ops.recover.CrossMoments` of the full input ``a`` and the kept channels ``z`` are accumulated
  (activations are never stored; at most ``max_positions`` seeded random pixels per image). One pass: ``z = a_K``.
  Sequential (error-accumulation correction as in He et al. 2017): consumers are processed level by level from input
  to output and ``z`` is read from the partly recovered pruned model, so each consumer also corrects the drift of its
  kept inputs. Every fifth batch is held out to choose the ridge factor ``α ∈ {1e-4, 1e-3, 1e-2}`` of R2.
  MatMul consumers (no bias to absorb the offset), grouped consumers and strided ConvTranspose are skipped and
  recorded.
* ``lstsq`` (R3, the default): every affected Conv (per group: depthwise and grouped layers too), Gemm and MatMul
  refit by least squares on im2col patches of its pruned input against the original model's output
  (:mod:`pipeline.refit`, algebra in :mod:`graph_ops.refit`).

Recovery only rewrites weights and biases: the graph's structure and interface never change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import onnx

from graph_ops.channels import Edit, analyze_with_edits, node_name
from graph_ops.errors import PreconditionError
from graph_ops.groups import ChannelGroupIndex
from graph_ops.io import verify_model
from graph_ops.prune import check_index, kept_indices
from graph_ops.recover import (
    ALPHAS,
    ChannelMap,
    CrossMoments,
    drift_mean,
    fold_map,
    map_error,
    select_drift,
    write_consumer,
)
from pipeline.errors import UserInputError
from pipeline.layerwise import MIN_ROWS_PER_DIM, layer_levels, level_progress, node_by_name, stream_pairs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsumerRecovery:
    """What recovery did to one consumer.

    ``error_mean`` / ``error_after``: held-out ``Σ||a - F z - f||²`` of the mean-only map and of the map used,
    relative to plain removal (``F = E``, ``f = 0``; in one-pass mode that is ``Σ||a_R||²``).
    """

    node: str
    op_type: str
    tensor: str
    kept: int
    removed: int
    alpha: float | None
    error_mean: float
    error_after: float


@dataclass(frozen=True)
class RecoveryReport:
    """Summary of one recovery run: per rewritten layer a :class:`ConsumerRecovery` (R1 / R2) or a
    :class:`pipeline.refit.LayerRefit` (R3), and the layers skipped with a reason."""

    method: str
    samples: int
    consumers: tuple[Any, ...]
    skipped: tuple[tuple[str, str], ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"method": self.method, "samples": self.samples, "consumers": [asdict(c) for c in self.consumers],
                "skipped": [list(s) for s in self.skipped], "notes": list(self.notes)}


@dataclass(frozen=True)
class _Target:
    node: str
    op_type: str
    index: int
    tensor: str  # what the consumer reads (flattened for a Gemm after Flatten)
    axis: int
    block: int
    channels: int
    kept: np.ndarray
    out_axis: int = 0
    out_keep: np.ndarray | None = None  # kept output channels when the consumer is also a pruned producer


Solver = Callable[[CrossMoments, CrossMoments | None, np.ndarray, float | None], ChannelMap | None]


def _bias(fit: CrossMoments, held: CrossMoments | None, kept: np.ndarray, ridge: float | None) -> ChannelMap | None:
    return drift_mean(fit if held is None else fit.merge(held), kept)


def _regress(fit: CrossMoments, held: CrossMoments | None, kept: np.ndarray,
             ridge: float | None) -> ChannelMap | None:
    return select_drift(fit, held, kept, ALPHAS if ridge is None else (float(ridge),))


def consumer_targets(original: onnx.ModelProto, index: ChannelGroupIndex,
                     keep: Mapping[str, Sequence[int]]) -> tuple[list[_Target], list[tuple[str, str]]]:
    """Exit consumers whose input loses channels under ``keep``, and the skipped ones with a reason."""
    fresh, edits = analyze_with_edits(original)
    check_index(index, fresh)
    plan = fresh.validate_keep(keep)
    targets: list[_Target] = []
    skipped: list[tuple[str, str]] = []
    for edit in edits:
        segments = fresh.by_tensor[edit.tensor]
        if edit.role != "consumer" or edit.kind != "take" or not any(s.group_id in plan for s in segments):
            continue
        node = original.graph.node[edit.node]
        name = node_name(node, edit.node)
        reason = _unsupported(node)
        if reason:
            skipped.append((name, f"{reason}; left as plain removal"))
            continue
        out_axis, out_keep = _output_rows(edits, edit.node, fresh, plan)
        targets.append(_Target(name, node.op_type, edit.node, node.input[0], edit.axis, edit.block,
                               sum(s.length for s in segments), kept_indices(segments, plan, 1), out_axis, out_keep))
    return targets, skipped


def _unsupported(node: onnx.NodeProto) -> str | None:
    """Why a consumer cannot absorb a channel map, or None."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        return "MatMul has no bias to absorb the offset"
    if attrs.get("group", 1) != 1:
        return f"{node.op_type} with group={attrs['group']} is not dense over channels"
    if node.op_type == "ConvTranspose" and any(s != 1 for s in attrs.get("strides", [])):
        return "strided ConvTranspose: the offset term differs between output phases"
    return None


def _output_rows(edits: Sequence[Edit], node: int, index: ChannelGroupIndex,
                 plan: Mapping[str, np.ndarray]) -> tuple[int, np.ndarray | None]:
    """The weight's output axis and kept output rows when the plan also shrinks the consumer's own output."""
    for edit in edits:
        if edit.node == node and edit.pos == 1 and edit.role == "producer" and edit.kind == "take":
            segments = index.by_tensor[edit.tensor]
            if any(s.group_id in plan for s in segments):
                return edit.axis, kept_indices(segments, dict(plan), edit.block)
    return 0, None


class _Moments:
    """float64 accumulator of :class:`CrossMoments` for one consumer input."""

    def __init__(self, channels: int, block: int, kept: np.ndarray) -> None:
        self.channels, self.block, self.kept, self.count = channels, block, kept, 0
        k = kept.size
        self.sums_a, self.sums_z = np.zeros((channels, block)), np.zeros((k, block))
        self.gram_a, self.gram_z, self.cross = np.zeros((channels, channels)), np.zeros((k, k)), np.zeros((channels, k))

    def add(self, a: np.ndarray, z: np.ndarray | None, rng: np.random.Generator, max_positions: int | None) -> None:
        """Fold one batch: ``a`` from the original model, ``z`` from the pruned one (None: ``a``'s kept channels)."""
        a = np.asarray(a, dtype=np.float64).reshape(a.shape[0], self.channels, -1)
        z = a[:, self.kept] if z is None else np.asarray(z, dtype=np.float64).reshape(a.shape[0], self.kept.size, -1)
        if self.block == 1:  # convolutional input: pixels are samples
            if max_positions is not None and a.shape[2] > max_positions:
                pick = np.sort(rng.choice(a.shape[2], max_positions, replace=False))
                a, z = a[:, :, pick], z[:, :, pick]
            a, z = (v.transpose(0, 2, 1).reshape(-1, v.shape[1], 1) for v in (a, z))
        elif a.shape[2] != self.block:
            raise PreconditionError(f"tensor has {a.shape[2]} positions per channel, analysis expected {self.block}")
        self.count += a.shape[0]
        self.sums_a += a.sum(axis=0)
        self.sums_z += z.sum(axis=0)
        rows_a, rows_z = (v.transpose(0, 2, 1).reshape(-1, v.shape[1]) for v in (a, z))
        self.gram_a += rows_a.T @ rows_a
        self.gram_z += rows_z.T @ rows_z
        self.cross += rows_a.T @ rows_z

    def freeze(self) -> CrossMoments:
        """The accumulated moments."""
        return CrossMoments(self.count, self.sums_a.copy(), self.sums_z.copy(), self.gram_a.copy(),
                            self.gram_z.copy(), self.cross.copy())


def collect_moments(original: onnx.ModelProto, current: onnx.ModelProto | None, targets: Sequence[_Target],
                    dataset: Any, *, max_positions: int | None = 1024, seed: int = 0,
                    **session: Any) -> dict[str, tuple[CrossMoments, CrossMoments]]:
    """Stream ``dataset`` through ``original`` (and ``current``, the partly recovered pruned model, when given).

    ``session`` takes :func:`pipeline.layerwise.stream_pairs` options (batch_size, backend, intra_op_threads).

    Returns:
        Per consumer input tensor, (fit, held-out) :class:`CrossMoments`.
    """
    shapes = {t.tensor: (t.channels, t.block, t.kept) for t in targets}
    names = sorted(shapes)
    acc = {name: (_Moments(*shapes[name]), _Moments(*shapes[name])) for name in names}
    rng = np.random.default_rng(seed)
    for held, outs, cur in stream_pairs(original, names, current, names if current is not None else [], dataset,
                                        **session):
        for j, name in enumerate(names):
            acc[name][int(held)].add(outs[j], cur[j] if cur else None, rng, max_positions)
    return {name: (fit.freeze(), held.freeze()) for name, (fit, held) in acc.items()}


def _recover_one(pruned: onnx.ModelProto, original: onnx.ModelProto, target: _Target, moments: tuple,
                 solver: Solver, ridge: float | None) -> ConsumerRecovery:
    from onnx import numpy_helper

    fit, held = moments
    held = held if held.count else None
    if fit.count < MIN_ROWS_PER_DIM * target.kept.size:
        logger.warning("consumer '%s': %d calibration vectors for %d kept input channels (about %d needed); the "
                       "regression may overfit: give more calibration samples", target.node, fit.count,
                       target.kept.size, MIN_ROWS_PER_DIM * target.kept.size)
    cmap = solver(fit, held, target.kept, ridge)
    check = held if held is not None else fit
    plain = ChannelMap(drift_mean(fit, target.kept).matrix, np.zeros(fit.sums_a.shape))
    base = max(map_error(check, plain), 1e-30)
    node = original.graph.node[target.index]
    weight = numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == node.input[1]))
    new_weight, delta = fold_map(weight, target.axis, target.block, target.kept, cmap)
    if target.out_keep is not None:  # replay the producer edit of the consumer's own output rows
        new_weight = np.take(new_weight, target.out_keep, axis=target.out_axis)
        delta = delta[target.out_keep]
    write_consumer(pruned, node_by_name(pruned, target.node), new_weight, delta)
    return ConsumerRecovery(target.node, target.op_type, target.tensor, int(target.kept.size),
                            target.channels - int(target.kept.size), cmap.alpha,
                            map_error(check, drift_mean(fit, target.kept)) / base, map_error(check, cmap) / base)


def _try_one(pruned: onnx.ModelProto, original: onnx.ModelProto, target: _Target, moments: tuple, solver: Solver,
             ridge: float | None) -> ConsumerRecovery | tuple[str, str]:
    """Recover one consumer, or return (node, reason) when its weights cannot take the fill."""
    try:
        return _recover_one(pruned, original, target, moments, solver, ridge)
    except PreconditionError as err:
        logger.warning("recovery skipped consumer '%s': %s", target.node, err)
        return target.node, str(err)


@dataclass(frozen=True)
class RecoveryOptions:
    """Settings shared by the recovery methods (see :func:`recover`)."""

    ridge: float | None = None
    batch_size: int = 64
    max_positions: int | None = 1024
    refit_positions: int | None = 64
    refit_max_dim: int = 5000
    seed: int = 0
    sequential: bool = True
    backend: str = "auto"
    intra_op_threads: int | None = None
    progress: bool = False

    def session(self) -> dict[str, Any]:
        """Options of :func:`pipeline.layerwise.stream_pairs`."""
        return {"batch_size": self.batch_size, "backend": self.backend, "intra_op_threads": self.intra_op_threads}


Outcome = tuple[list[Any], list[tuple[str, str]]]


def _map_level(solver: Solver, original: onnx.ModelProto, out: onnx.ModelProto, batch: Sequence[_Target],
               dataset: Any, opts: RecoveryOptions) -> Outcome:
    """One data pass: the channel maps of the consumers in ``batch`` (independent of each other), written into
    ``out``."""
    if not batch:
        return [], []
    moments = collect_moments(original, out if opts.sequential else None, batch, dataset,
                              max_positions=opts.max_positions, seed=opts.seed, **opts.session())
    results = [_try_one(out, original, t, moments[t.tensor], solver, opts.ridge) for t in batch]
    return [r for r in results if isinstance(r, ConsumerRecovery)], [r for r in results if isinstance(r, tuple)]


def map_recovery(solver: Solver, original: onnx.ModelProto, out: onnx.ModelProto, index: ChannelGroupIndex,
                 keep: Mapping[str, Sequence[int]], dataset: Any, opts: RecoveryOptions) -> Outcome:
    """R1 / R2: a channel map of every consumer's input folded into its weights, level by level when sequential."""
    targets, skipped = consumer_targets(original, index, keep)
    levels = layer_levels(original, [t.index for t in targets]) if opts.sequential else [0] * len(targets)
    done: list[Any] = []
    for level in level_progress(levels, opts.progress):
        got, missed = _map_level(solver, original, out, [t for t, lvl in zip(targets, levels, strict=True)
                                                         if lvl == level], dataset, opts)
        done += got
        skipped += missed
    return done, skipped


def lstsq_recovery(original: onnx.ModelProto, out: onnx.ModelProto, index: ChannelGroupIndex,
                   keep: Mapping[str, Sequence[int]], dataset: Any, opts: RecoveryOptions) -> Outcome:
    """R3: every affected layer refit on its pruned input against the original output (:mod:`pipeline.refit`).

    A layer with more than ``opts.refit_max_dim`` unknowns per output (say a Flatten -> Gemm head of 25,088 inputs,
    whose Gram matrix alone would take 5 GB) gets R2 instead, at its level, when it is a channel-map consumer.
    """
    from pipeline.refit import refit_model

    r2_targets: dict[str, _Target] = {}

    def fallback(names: Sequence[str]) -> Outcome:
        if not r2_targets:  # analysed only when some layer is too large for R3
            r2_targets.update((t.node, t) for t in consumer_targets(original, index, keep)[0])
        batch = [r2_targets[n] for n in names if n in r2_targets]
        done, skipped = _map_level(_regress, original, out, batch, dataset, opts)
        return done, [*skipped, *((n, f"more than {opts.refit_max_dim} unknowns per output for R3 and not a "
                                      "channel-map consumer for R2; left as it is") for n in names
                                  if n not in r2_targets)]

    return refit_model(original, out, index, keep, dataset, sequential=opts.sequential, ridge=opts.ridge,
                       positions=opts.refit_positions, seed=opts.seed, progress=opts.progress,
                       max_dim=opts.refit_max_dim, fallback=fallback, **opts.session())


Recovery = Callable[[onnx.ModelProto, onnx.ModelProto, ChannelGroupIndex, Mapping[str, Sequence[int]], Any,
                     RecoveryOptions], Outcome]

RECOVERY: dict[str, Recovery | None] = {
    "none": None,
    "bias": partial(map_recovery, _bias),
    "regress": partial(map_recovery, _regress),
    "lstsq": lstsq_recovery,
}
DEFAULT_RECOVERY = "lstsq"


def recover(original: onnx.ModelProto, pruned: onnx.ModelProto, index: ChannelGroupIndex,
            keep: Mapping[str, Sequence[int]], dataset: Any, *, method: str = DEFAULT_RECOVERY,
            sequential: bool = True, **options: Any) -> tuple[onnx.ModelProto, RecoveryReport]:
    """Rewrite a pruned model's weights so that it compensates for the removed channels.

    Args:
        original: the (canonical) model ``index`` and the plan refer to; statistics are taken on it.
        pruned: ``apply_plan(original, index, keep)`` (not mutated).
        index: ``analyze(original)``.
        keep: the plan's kept channels per group.
        dataset: calibration :class:`pipeline.data.Dataset` (training split; labels are not needed).
        method: a key of :data:`RECOVERY`: ``none``, ``bias`` (R1), ``regress`` (R2) or ``lstsq`` (R3).
        sequential: error-accumulation correction: layers are recovered level by level (input to output), each
            fitted on inputs of the partly recovered pruned model against the original model (one data pass per
            level); False: one pass (R1 / R2: statistics of the original model only).
        options: fields of :class:`RecoveryOptions`: ``ridge`` (fixed ridge factor α; default: chosen on
            held-out batches), ``batch_size``, ``max_positions`` (pixels sampled per image for R1 / R2; None: all),
            ``refit_positions`` (output positions sampled per image for R3; None: all), ``refit_max_dim`` (R3:
            layers with more unknowns per output, whose Gram matrix would not fit in memory comfortably, get R2
            instead), ``seed``, ``backend``,
            ``intra_op_threads`` (see :func:`pipeline.calibrate.open_session`), ``progress`` (a tqdm bar over the
            levels on stderr).

    Returns:
        The recovered model (verified with the full ONNX checker) and a :class:`RecoveryReport`.

    Raises:
        UserInputError: unknown method or option, or no data for a data-driven method.
        PlanValidationError: the plan or index does not fit ``original``.
        CalibrationError: data that does not fit the model, or NaN/Inf activations.
    """
    if method not in RECOVERY:
        raise UserInputError(f"unknown recovery method '{method}'; choose one of {', '.join(RECOVERY)}")
    try:
        opts = RecoveryOptions(sequential=sequential, **options)
    except TypeError as err:
        raise UserInputError(f"recover(): {err}") from err
    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    notes = ("sequential: inputs from the partly recovered pruned model, targets from the original",) if sequential \
        else ("one pass: no error-accumulation correction",)
    run = RECOVERY[method]
    if run is None:
        return out, RecoveryReport(method, 0, (), (), notes)
    if dataset is None:
        raise UserInputError(f"recovery '{method}' needs calibration data (the training split); give a dataset")
    done, skipped = run(original, out, index, keep, dataset, opts)
    verify_model(out)
    samples = getattr(dataset, "num_samples", None)
    logger.info("recovery '%s': %d layers rewritten, %d skipped", method, len(done), len(skipped))
    return out, RecoveryReport(method, samples or 0, tuple(done), tuple(skipped), notes)

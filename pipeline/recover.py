"""Training-free recovery after channel removal: statistics with onnxruntime, then the weight algebra of
:mod:`graph_ops.recover` on every exit consumer whose input lost channels.

Procedure (methods.md 6.2, R1 / R2): for each consumer edit recorded by analysis (Conv ``W[:, c]``, ConvTranspose
``W[c]``, Gemm K rows, in ``H*W`` blocks after Flatten) whose input tensor loses channels under the plan, stream the
calibration data through the ORIGINAL model with the consumer inputs exposed as outputs and accumulate float64
:class:`graph_ops.recover.CrossMoments` of the full input ``a`` and the kept channels ``z`` (activations are never
stored; at most ``max_positions`` seeded random pixels per image for a convolutional input). In the default one-pass
mode ``z = a_K`` (statistics of the original model only: plain R1 / R2). With ``sequential=True`` (error-accumulation
correction as in He et al. 2017) consumers are processed level by level from input to output and ``z`` is read from
the partly recovered pruned model, one data pass per level, so each consumer also corrects the drift of its kept
inputs. Every fifth batch is held out to choose the ridge factor ``α ∈ {1e-4, 1e-3, 1e-2}`` of R2 by reconstruction
error; the map is then refit on all batches and folded into the pruned model's consumer weight and bias (node and
tensor names are kept by ``apply_plan``; a consumer that is itself a pruned producer has its output rows re-sliced).

Limits: MatMul consumers (no bias to absorb the fill) are skipped and recorded; grouped or depthwise consumers never
carry a consumer edit (analysis freezes them or passes channels through), and a Conv consumer with ``group != 1`` would
be skipped and recorded. Recovery only rewrites consumer weights and biases: the graph interface never changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from graph_ops.channels import Edit, analyze_with_edits, node_name
from graph_ops.errors import PreconditionError
from graph_ops.groups import ChannelGroupIndex
from graph_ops.io import verify_model
from graph_ops.probes import expose_tensors
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
from pipeline.errors import CalibrationError, UserInputError

logger = logging.getLogger(__name__)

MIN_VECTORS_PER_DIM = 10  # methods.md: at least 10x more samples than the regression's dimension
HOLD_OUT_EVERY = 5  # batch i is held out (for choosing α) when i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1


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
    """Summary of one recovery run."""

    method: str
    samples: int
    consumers: tuple[ConsumerRecovery, ...]
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


def _none(fit: CrossMoments, held: CrossMoments | None, kept: np.ndarray, ridge: float | None) -> ChannelMap | None:
    return None


def _bias(fit: CrossMoments, held: CrossMoments | None, kept: np.ndarray, ridge: float | None) -> ChannelMap | None:
    return drift_mean(fit if held is None else fit.merge(held), kept)


def _regress(fit: CrossMoments, held: CrossMoments | None, kept: np.ndarray,
             ridge: float | None) -> ChannelMap | None:
    return select_drift(fit, held, kept, ALPHAS if ridge is None else (float(ridge),))


RECOVERY: dict[str, Solver] = {"none": _none, "bias": _bias, "regress": _regress}


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


def _run(session: Any, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    try:
        outputs = session.run(list(names), dict(feeds))
    except Exception as err:  # onnxruntime raises its own exception types
        raise CalibrationError(f"onnxruntime failed while collecting recovery statistics: {err}") from err
    for name, value in zip(names, outputs, strict=True):
        if not np.all(np.isfinite(value)):
            raise CalibrationError(f"tensor '{name}' has NaN/Inf values on the recovery data")
    return outputs


def collect_moments(original: onnx.ModelProto, current: onnx.ModelProto | None, targets: Sequence[_Target],
                    dataset: Any, *, batch_size: int = 64, max_positions: int | None = 1024, seed: int = 0,
                    backend: str = "auto", intra_op_threads: int | None = None) -> tuple[dict[str, tuple], int]:
    """Stream ``dataset`` through ``original`` (and ``current``, the partly recovered pruned model, when given).

    Returns:
        Per consumer input tensor, (fit, held-out) :class:`CrossMoments`, and the number of samples.
    """
    from pipeline.calibrate import model_input_specs, open_session
    from pipeline.data import validate_batch

    shapes = {t.tensor: (t.channels, t.block, t.kept) for t in targets}
    names = sorted(shapes)
    sessions = [open_session(expose_tensors(m, names).SerializeToString(), backend, intra_op_threads)
                for m in (original, current) if m is not None]
    specs = model_input_specs(original)
    acc = {name: (_Moments(*shapes[name]), _Moments(*shapes[name])) for name in names}
    rng, samples = np.random.default_rng(seed), 0
    for i, (feeds, _) in enumerate(dataset.bind(list(specs)).batches(batch_size)):
        validate_batch(feeds, specs, f"dataset '{dataset.name}'")
        runs = [_run(session, names, feeds) for session in sessions]
        part = 1 if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 else 0
        for j, name in enumerate(names):
            acc[name][part].add(runs[0][j], runs[1][j] if current is not None else None, rng, max_positions)
        samples += runs[0][0].shape[0]
    if samples == 0:
        raise CalibrationError("the recovery dataset yielded no samples")
    return {name: (fit.freeze(), held.freeze()) for name, (fit, held) in acc.items()}, samples


def _recover_one(pruned: onnx.ModelProto, original: onnx.ModelProto, target: _Target, moments: tuple,
                 solver: Solver, ridge: float | None) -> ConsumerRecovery:
    from onnx import numpy_helper

    fit, held = moments
    held = held if held.count else None
    if fit.count < MIN_VECTORS_PER_DIM * target.kept.size:
        logger.warning("consumer '%s': %d calibration vectors for %d kept input channels (about %d needed); the "
                       "regression may overfit: give more calibration samples", target.node, fit.count,
                       target.kept.size, MIN_VECTORS_PER_DIM * target.kept.size)
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
    write_consumer(pruned, _node_by_name(pruned, target.node), new_weight, delta)
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


def _levels(model: onnx.ModelProto, targets: Sequence[_Target]) -> list[int]:
    """Per target, how many other targets lie upstream of its input on the longest path (graph order is
    topological)."""
    by_index = {t.index: t for t in targets}
    depth: dict[str, int] = {}
    level: dict[int, int] = {}
    for idx, node in enumerate(model.graph.node):
        here = max((depth.get(name, 0) for name in node.input if name), default=0)
        if idx in by_index:
            level[idx] = here
            here += 1
        for name in node.output:
            depth[name] = here
    return [level[t.index] for t in targets]


def _node_by_name(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for idx, node in enumerate(model.graph.node):
        if node_name(node, idx) == name:
            return node
    raise PreconditionError(f"pruned model has no node '{name}'; pass the model apply_plan returned")


def recover(original: onnx.ModelProto, pruned: onnx.ModelProto, index: ChannelGroupIndex,
            keep: Mapping[str, Sequence[int]], dataset: Any, *, method: str = "regress", ridge: float | None = None,
            batch_size: int = 64, max_positions: int | None = 1024, seed: int = 0, sequential: bool = False,
            backend: str = "auto", intra_op_threads: int | None = None) -> tuple[onnx.ModelProto, RecoveryReport]:
    """Rewrite the consumers of a pruned model so that they compensate for the removed channels.

    Args:
        original: the (canonical) model ``index`` and the plan refer to; statistics are taken on it.
        pruned: ``apply_plan(original, index, keep)`` (not mutated).
        index: ``analyze(original)``.
        keep: the plan's kept channels per group.
        dataset: calibration :class:`pipeline.data.Dataset` (training split; labels are not needed).
        method: a key of :data:`RECOVERY` (``none``, ``bias`` = R1, ``regress`` = R2).
        ridge: fixed ridge factor α for R2 (default: chosen from 1e-4, 1e-3, 1e-2 on held-out batches).
        batch_size: samples per onnxruntime call.
        max_positions: pixels sampled per image for convolutional inputs (None: all).
        seed: seed of the pixel sampling.
        sequential: error-accumulation correction: consumers are recovered level by level (input to output), each
            fitted on inputs of the partly recovered pruned model against the original model's inputs (one data
            pass per level); default: one pass, statistics of the original model only.
        backend, intra_op_threads: onnxruntime settings (see :func:`pipeline.calibrate.open_session`).

    Returns:
        The recovered model (verified with the full ONNX checker) and a :class:`RecoveryReport`.

    Raises:
        UserInputError: unknown method or no data for a data-driven method.
        PlanValidationError: the plan or index does not fit ``original``.
        CalibrationError: data that does not fit the model, or NaN/Inf activations.
    """
    if method not in RECOVERY:
        raise UserInputError(f"unknown recovery method '{method}'; choose one of {', '.join(RECOVERY)}")
    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    targets, skipped = consumer_targets(original, index, keep)
    notes = ("sequential: inputs from the partly recovered pruned model, targets from the original",) if sequential \
        else ("statistics from the original model; no error-accumulation correction",)
    if method == "none" or not targets:
        return out, RecoveryReport(method, 0, (), tuple(skipped), notes)
    if dataset is None:
        raise UserInputError(f"recovery '{method}' needs calibration data (the training split); give a dataset")
    levels = _levels(original, targets) if sequential else [0] * len(targets)
    done, samples = [], 0
    for level in sorted(set(levels)):
        batch = [t for t, lvl in zip(targets, levels, strict=True) if lvl == level]
        moments, samples = collect_moments(original, out if sequential else None, batch, dataset,
                                           batch_size=batch_size, max_positions=max_positions, seed=seed,
                                           backend=backend, intra_op_threads=intra_op_threads)
        results = [_try_one(out, original, t, moments[t.tensor], RECOVERY[method], ridge) for t in batch]
        done += [r for r in results if isinstance(r, ConsumerRecovery)]
        skipped += [r for r in results if isinstance(r, tuple)]
    verify_model(out)
    logger.info("recovery '%s': %d consumers rewritten, %d skipped, %d samples", method, len(done), len(skipped),
                samples)
    return out, RecoveryReport(method, samples, tuple(done), tuple(skipped), notes)

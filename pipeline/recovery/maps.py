"""R1 (``bias``) and R2 (``regress``): a channel map of every exit consumer's input, folded into its weights.

For each consumer edit recorded by analysis (Conv ``W[:, c]``, ConvTranspose ``W[c]``, Gemm K rows, in ``H*W``
blocks after Flatten) whose input loses channels, float64 :class:`graph_ops.channel_fill.CrossMoments` of the full
input ``a`` in the ORIGINAL model and of the kept channels ``z`` are accumulated (each batch's products in float32 on
mean-shifted rows, summed in float64: :func:`graph_ops.least_squares.products`; activations are never stored; at
most ``max_positions`` random pixels per image, drawn from :func:`batch_rng` of ``(seed, level, batch)``) and a map ``a ≈ F z + f`` is solved and folded into the
consumer (algebra: :mod:`graph_ops.channel_fill`). One pass: ``z = a_K`` from the original. Sequential
(error-accumulation correction as in He et al. 2017): consumers are processed level by level from input to output
(:mod:`pipeline.recovery.sweep`) and ``z`` is read from the partly recovered pruned model, so each consumer also
corrects the drift of its kept inputs. Every fifth batch is held out to choose the ridge factor
``α ∈ {1e-4, 1e-3, 1e-2}`` of R2. MatMul consumers (no bias to absorb the offset), grouped consumers and strided
ConvTranspose are skipped and recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from graph_ops.channel_fill import (
    ALPHAS,
    ChannelMap,
    CrossMoments,
    drift_mean,
    fold_map,
    map_error,
    select_drift,
    write_consumer,
)
from graph_ops.errors import PreconditionError
from graph_ops.groups import ChannelGroupIndex, Edit
from graph_ops.least_squares import PRODUCTS, products
from graph_ops.proto import attrs, fingerprint, node_index, node_name
from graph_ops.prune import kept_indices
from pipeline.recovery.levels import LevelJob, LevelPlan
from pipeline.recovery.sweep import MIN_ROWS_PER_DIM, batch_rng, layer_levels

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
class MapTarget:
    """One consumer to recover: its node, the input it reads, the channel layout of that input under the plan."""

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


def bias_solver(fit: CrossMoments, held: CrossMoments | None, kept: np.ndarray,
                ridge: float | None) -> ChannelMap | None:
    """R1: the mean-only map."""
    return drift_mean(fit if held is None else fit.merge(held), kept)


def regress_solver(fit: CrossMoments, held: CrossMoments | None, kept: np.ndarray,
                   ridge: float | None) -> ChannelMap | None:
    """R2: ridge regression of the removed part, the ridge chosen on held-out moments (or fixed)."""
    return select_drift(fit, held, kept, ALPHAS if ridge is None else (float(ridge),))


def consumer_targets(original: onnx.ModelProto, index: ChannelGroupIndex,
                     keep: Mapping[str, Sequence[int]]) -> tuple[list[MapTarget], list[tuple[str, str]]]:
    """Exit consumers whose input loses channels under ``keep``, and the skipped ones with a reason.

    ``index`` is ``analyze(original)`` (checked by fingerprint; its edits name the consumers)."""
    index.check_model(fingerprint(original))
    plan = index.validate_keep(keep)
    targets: list[MapTarget] = []
    skipped: list[tuple[str, str]] = []
    for edit in index.edits:
        segments = index.by_tensor[edit.tensor]
        if edit.role != "consumer" or edit.kind != "take" or not any(s.group_id in plan for s in segments):
            continue
        node = original.graph.node[edit.node]
        name = node_name(node, edit.node)
        reason = _unsupported(node)
        if reason:
            skipped.append((name, f"{reason}; left as plain removal"))
            continue
        out_axis, out_keep = _output_rows(index.edits, edit.node, index, plan)
        targets.append(MapTarget(name, node.op_type, edit.node, node.input[0], edit.axis, edit.block,
                                 sum(s.length for s in segments), kept_indices(segments, plan, 1), out_axis,
                                 out_keep))
    return targets, skipped


def _unsupported(node: onnx.NodeProto) -> str | None:
    """Why a consumer cannot absorb a channel map, or None."""
    values = attrs(node)
    if node.op_type == "MatMul":
        return "MatMul has no bias to absorb the offset"
    if values.get("group", 1) != 1:
        return f"{node.op_type} with group={values['group']} is not dense over channels"
    if node.op_type == "ConvTranspose" and any(s != 1 for s in values.get("strides", [])):  # type: ignore[union-attr]
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
    """float64 accumulator of :class:`CrossMoments` for one consumer input (arrays allocated on the first batch;
    one batch's products in float32, :func:`graph_ops.least_squares.products`)."""

    def __init__(self, channels: int, block: int, kept: np.ndarray) -> None:
        self.channels, self.block, self.kept, self.count = channels, block, kept, 0
        self.sums_a = self.sums_z = self.gram_a = self.gram_z = self.cross = np.zeros(0)

    def _allocate(self) -> None:
        k, c = self.kept.size, self.channels
        self.sums_a, self.sums_z = np.zeros((c, self.block)), np.zeros((k, self.block))
        self.gram_a, self.gram_z, self.cross = np.zeros((c, c)), np.zeros((k, k)), np.zeros((c, k))

    def add(self, a: np.ndarray, z: np.ndarray | None, rng: np.random.Generator, max_positions: int | None) -> None:
        """Fold one batch: ``a`` from the original model, ``z`` from the pruned one (None: ``a``'s kept channels)."""
        if self.count == 0:
            self._allocate()
        a = np.asarray(a, dtype=PRODUCTS).reshape(a.shape[0], self.channels, -1)
        z = a[:, self.kept] if z is None else np.asarray(z, dtype=PRODUCTS).reshape(a.shape[0], self.kept.size, -1)
        if self.block == 1:  # convolutional input: pixels are samples
            if max_positions is not None and a.shape[2] > max_positions:
                pick = np.sort(rng.choice(a.shape[2], max_positions, replace=False))
                a, z = a[:, :, pick], z[:, :, pick]
            a, z = (v.transpose(0, 2, 1).reshape(-1, v.shape[1], 1) for v in (a, z))
        elif a.shape[2] != self.block:
            raise PreconditionError(f"tensor has {a.shape[2]} positions per channel, analysis expected {self.block}")
        self.count += a.shape[0]
        self.sums_a += a.sum(axis=0, dtype=np.float64)
        self.sums_z += z.sum(axis=0, dtype=np.float64)
        rows_a, rows_z = (v.transpose(0, 2, 1).reshape(-1, 1, v.shape[1]) for v in (a, z))
        self.gram_a += products(rows_a)[0]
        self.gram_z += products(rows_z)[0]
        self.cross += products(rows_a, rows_z)[0]

    def freeze(self) -> CrossMoments | None:
        """The accumulated moments (None before any vector)."""
        if self.count == 0:
            return None
        return CrossMoments(self.count, self.sums_a.copy(), self.sums_z.copy(), self.gram_a.copy(),
                            self.gram_z.copy(), self.cross.copy())


def _recover_one(pruned: onnx.ModelProto, original: onnx.ModelProto, target: MapTarget, fit: CrossMoments,
                 held: CrossMoments | None, solver: Solver, ridge: float | None) -> ConsumerRecovery:
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
    write_consumer(pruned, node_index(pruned, target.node), new_weight, delta)
    return ConsumerRecovery(target.node, target.op_type, target.tensor, int(target.kept.size),
                            target.channels - int(target.kept.size), cmap.alpha,
                            map_error(check, drift_mean(fit, target.kept)) / base, map_error(check, cmap) / base)


class MapLevel(LevelJob):
    """The channel maps of one level's consumers: one moment pair (fit, held-out) per consumer input."""

    def __init__(self, targets: Sequence[MapTarget], original: onnx.ModelProto, out: onnx.ModelProto,
                 solver: Solver, *, sequential: bool, ridge: float | None, max_positions: int | None,
                 seed: int, level: int) -> None:
        """Plan the level: which tensors are read (``a`` from the original, ``z`` from the pruned model)."""
        self.targets, self.model, self.out, self.solver, self.ridge = list(targets), original, out, solver, ridge
        self.shapes = {t.tensor: (t.channels, t.block, t.kept) for t in self.targets}
        self.names = sorted(self.shapes)
        self.original = tuple(self.names)
        self.current = tuple(self.names) if sequential else ()
        self.acc = self._fresh()
        self.seed, self.level, self.max_positions = seed, level, max_positions

    def _fresh(self) -> dict[str, tuple[_Moments, _Moments]]:
        return {name: (_Moments(*self.shapes[name]), _Moments(*self.shapes[name])) for name in self.names}

    def add(self, batch: int, held: bool, original: Mapping[str, np.ndarray],
            current: Mapping[str, np.ndarray]) -> None:
        """Fold one batch into every consumer input's moments (inputs in sorted order, one rng per batch)."""
        rng = batch_rng(self.seed, self.level, batch)
        for name in self.names:
            self.acc[name][int(held)].add(original[name], current.get(name), rng, self.max_positions)

    def take(self) -> dict[str, tuple[CrossMoments | None, CrossMoments | None]]:
        """Per consumer input, the (fit, held-out) moments folded since the last call."""
        part = {name: (fit.freeze(), held.freeze()) for name, (fit, held) in self.acc.items()}
        self.acc = self._fresh()
        return part

    def finish(self, moments: Any) -> tuple[list[Any], list[tuple[str, str]]]:
        """Solve and fold every consumer of the level into the pruned model."""
        done: list[Any] = []
        skipped: list[tuple[str, str]] = []
        moments = moments or {}
        for target in self.targets:
            fit, held = moments.get(target.tensor, (None, None))
            try:
                if fit is None:
                    raise PreconditionError("no calibration vectors to fit its channel map")
                done.append(_recover_one(self.out, self.model, target, fit, held, self.solver, self.ridge))
            except PreconditionError as err:
                logger.warning("recovery skipped consumer '%s': %s", target.node, err)
                skipped.append((target.node, str(err)))
        return done, skipped


def map_recovery(solver: Solver, original: onnx.ModelProto, out: onnx.ModelProto, index: ChannelGroupIndex,
                 keep: Mapping[str, Sequence[int]], opts: Any) -> LevelPlan:
    """R1 / R2 over every consumer, level by level when ``opts.sequential`` (one sweep over the data): the plan of
    the sweep (its jobs rewrite ``out``)."""
    targets, skipped = consumer_targets(original, index, keep)
    levels = layer_levels(original, [t.index for t in targets]) if opts.sequential else [0] * len(targets)
    jobs = {level: [MapLevel([t for t, lvl in zip(targets, levels, strict=True) if lvl == level], original, out,
                             solver, sequential=opts.sequential, ridge=opts.ridge, max_positions=opts.max_positions,
                             seed=opts.seed, level=level)] for level in sorted(set(levels))}
    return LevelPlan(dict(zip((t.index for t in targets), levels, strict=True)), jobs, tuple(skipped),
                     opts.sequential)

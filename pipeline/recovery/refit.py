"""R3 (``lstsq``) recovery: refit the layers of a pruned model by least squares against the original's outputs.

Which layers: every Conv and ConvTranspose (any ``group``: depthwise and grouped layers are solved per group; a
ConvTranspose is fitted on its transposed patches, :mod:`graph_ops.least_squares`), Gemm and MatMul whose
input differs between the original and the pruned model, i.e. whose input lost channels or lies downstream of a
layer that did (so a layer behind a protected group still has the drift of its input corrected).

How (methods.md 6.2, R3; algebra in :mod:`graph_ops.least_squares`): layers are processed level by level from input
to output (:mod:`pipeline.recovery.sweep`: one sweep advances both models a level at a time); for each level, the
ORIGINAL model gives the layer's output, restricted to the output channels the plan keeps (the target), and the
CURRENT pruned model, in which every upstream layer is already refit, gives the layer's input (im2col patches of the
kept channels at up to ``positions`` random output positions per image, drawn from :func:`batch_rng` of
``(seed, level, batch, layer)``; a MatMul over the last axis of an N-D input, a transformer's Linear, has one row
per token, up to ``positions`` random tokens per image). Float64 moments ``Σ x̃x̃ᵀ``, ``Σ x̃yᵀ``, ``Σ y²`` are
streamed (every fifth batch held out); the ridge factor is chosen on the held-out batches, the layer's current
weights compete (a refit that does not lower the held-out error is not applied) and the winner is refit on all
batches and written into the layer's weight and bias. With ``sequential=False`` every layer is fitted in one data
pass on the pruned model before any refit (faster, no error-accumulation correction). Cost per layer: about
``rows * dim²`` for the moments and ``dim³`` for each solve, memory ``8 dim²`` bytes per group; layers above
``max_dim`` unknowns get R2 at their level (:mod:`pipeline.recovery.maps`) when they are channel-map consumers, in
the same sweep step, or are skipped with a reason.

Rows where they are few: a wide layer on few images samples more positions (:func:`refit_positions`: towards
``MIN_ROWS_PER_DIM`` rows per unknown, at most ``POSITION_GROWTH`` x ``positions``). A layer behind a global average
pool (an SE block's first conv, a classifier) has one row per image whatever the map; its refit may blend in a
*position prior* (:class:`Pooled`): the pool's input at sampled positions in the pruned model against the ORIGINAL
layer applied to the original's pool input at the same positions (the pool is linear, so the original output is the
mean of these targets), weighted as the held-out error of the layer's own rows decides (weight 0 competes).

The graph's structure and interface never change: only weight and bias initializers are replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from graph_ops.errors import PreconditionError
from graph_ops.groups import ChannelGroupIndex
from graph_ops.least_squares import (
    PRODUCTS,
    REFIT_ALPHAS,
    REFIT_OPS,
    LayerShape,
    MomentSums,
    PatchMoments,
    choose_refit,
    coef_from_weights,
    conv_patches,
    gathered_rows,
    gathered_targets,
    patch_index,
    patch_rows,
    sample_positions,
    weights_from_coef,
)
from graph_ops.probes import PositionGather
from graph_ops.proto import (
    declared_shapes,
    fingerprint,
    layer_weights,
    node_index,
    node_name,
    opset,
    write_weights,
)
from graph_ops.prune import kept_indices
from pipeline.recovery.levels import LevelJob, LevelPlan
from pipeline.recovery.maps import MapLevel, MapTarget, consumer_targets, regress_solver
from pipeline.recovery.sweep import HOLD_OUT_EVERY, MIN_ROWS_PER_DIM, batch_rng, layer_levels

logger = logging.getLogger(__name__)

POSITION_GROWTH = 4  # refit_positions raised at most this many times for a wide layer (moments cost rows x dim^2)


@dataclass(frozen=True)
class LayerRefit:
    """What the refit did to one layer: held-out relative errors ``Σ||y - Wᵀx̃||² / Σ||y||²`` of the weights it
    had (``error_before``) and of the weights it got (``error_after``); ``alpha`` None: the weights were kept."""

    node: str
    op_type: str
    tensor: str
    rows: int
    dim: int
    alpha: float | None
    error_before: float
    error_after: float
    prior_weight: float = 0.0


@dataclass(frozen=True)
class Pooled:
    """A layer that reads a global average pool (through shape-only ops): where its per-position rows come from.

    ``original`` / ``current``: the pool's input in the original and in the pruned model (the same tensor name;
    all channels there, the kept ones here); ``coef``: the ORIGINAL layer's coefficients ``(1, C + 1, O_kept)``
    (intercept row last when it has one), which give each position's target."""

    original: str
    current: str
    coef: np.ndarray
    size: tuple[int, int, int, int] | None = None  # static (C in the original, C kept, H, W): gathered in the graph


@dataclass(frozen=True)
class _Layer:
    name: str
    index: int  # in the original graph (levels)
    input: str
    output: str
    out_keep: np.ndarray | None  # original output channels the pruned layer keeps (None: all)
    shape: LayerShape  # of the pruned layer
    dim: int  # unknowns per output: rows of the per-group Gram matrix
    gather: tuple[int, int, int, int, int, int] | None = None  # static (C_out, H_out, W_out, C_in, H_in, W_in)
    positions: int | None = None  # output positions (tokens) sampled per image; None: all
    pooled: Pooled | None = None  # a layer behind a global average pool: its per-position prior


def refit_positions(per_image: int | None, dim: int, samples: int | None) -> int | None:
    """Output positions to sample per image for a layer of ``dim`` unknowns per output: ``per_image``, raised so
    that the fitted rows reach ``MIN_ROWS_PER_DIM * dim`` where the map has them (``samples`` calibration images,
    a fifth of them held out), at most ``POSITION_GROWTH`` times ``per_image``. A small map gives all its positions
    anyway (:func:`graph_ops.least_squares.sample_positions`); a large map sampled at ``per_image`` positions gives a
    wide layer fewer rows than unknowns when the calibration set is small (PP-OCR's DBNet head: 96 x 3 x 3 inputs,
    50 pages of 120 x 120 positions: 2,560 fitted rows for 865 unknowns at 64 positions, 8,680 at 217)."""
    if per_image is None or not samples:
        return per_image
    fitted = max(1, samples - samples // HOLD_OUT_EVERY)
    wanted = -(-MIN_ROWS_PER_DIM * dim // fitted)
    return int(min(max(per_image, wanted), POSITION_GROWTH * per_image))


def _gather_geometry(node: onnx.NodeProto, shape: LayerShape, original: Mapping[str, tuple],
                     pruned: Mapping[str, tuple]) -> tuple[int, int, int, int, int, int] | None:
    """Static sizes a 2-D Conv's or ConvTranspose's gathers need (output channels and size in the original, input
    channels and size in the pruned model), or None (another layer, or a dynamic size: whole tensors are read)."""
    out, x = original.get(node.output[0]), pruned.get(node.input[0])
    if not shape.spatial or not out or not x or len(out) != 4 or len(x) != 4:
        return None
    dims = (out[1], out[2], out[3], x[1], x[2], x[3])
    return None if any(d is None for d in dims) else dims  # type: ignore[return-value]


def _changed_tensors(model: onnx.ModelProto, index: ChannelGroupIndex, plan: Mapping[str, np.ndarray]) -> set[str]:
    """Tensors that lose channels under the plan, and everything computed from them."""
    changed: set[str] = set()
    for node in model.graph.node:
        loses = any(kept_indices(segs, dict(plan)).size < sum(s.length for s in segs)
                    for segs in (index.by_tensor.get(o, ()) for o in node.output) if segs)
        if loses or any(name in changed for name in node.input):
            changed.update(node.output)
    return changed


def refit_targets(original: onnx.ModelProto, pruned: onnx.ModelProto, index: ChannelGroupIndex,
                  keep: Mapping[str, Sequence[int]]) -> tuple[list[_Layer], list[tuple[str, str]]]:
    """The layers to refit (topological order) and the skipped ones with a reason (``index``: ``analyze(original)``,
    checked by fingerprint)."""
    index.check_model(fingerprint(original))
    plan = index.validate_keep(keep)
    changed = _changed_tensors(original, index, plan)
    pruned_shapes = declared_shapes(pruned)
    gathers = opset(original) >= 11
    layers: list[_Layer] = []
    skipped: list[tuple[str, str]] = []
    for idx, node in enumerate(original.graph.node):
        if node.op_type not in REFIT_OPS or not node.input or node.input[0] not in changed:
            continue
        name = node_name(node, idx)
        try:
            target = pruned.graph.node[node_index(pruned, name)]
            weight, _ = layer_weights(pruned, target)
            shape = LayerShape.of(target, tuple(weight.shape))
        except PreconditionError as err:
            skipped.append((name, f"{err}; left as it is"))
            continue
        segs = index.by_tensor.get(node.output[0], ())
        out_keep = kept_indices(segs, dict(plan)) if segs else None
        if out_keep is not None and out_keep.size == sum(s.length for s in segs):
            out_keep = None
        geometry = _gather_geometry(node, shape, index.shapes, pruned_shapes) if gathers else None
        pooled = _pooled(original, node, shape, out_keep, index.shapes, pruned_shapes)
        layers.append(_Layer(name, idx, node.input[0], node.output[0], out_keep, shape, shape.dim(weight.shape),
                             geometry, pooled=pooled))
    return layers, skipped


SHAPE_ONLY = ("Reshape", "Flatten", "Squeeze", "Identity")


def _pooled(original: onnx.ModelProto, node: onnx.NodeProto, shape: LayerShape, out_keep: np.ndarray | None,
            shapes: Mapping[str, tuple], pruned_shapes: Mapping[str, tuple]) -> Pooled | None:
    """The per-position prior of a layer that reads ``GlobalAveragePool(h)`` through shape-only ops (a 1x1 Conv
    with unit strides and no padding, a Gemm, or a 2-D MatMul over the pooled channels), else None.

    Such a layer has one row per image: ``y = W mean_s h_s + b``. The original's output is the same mean over the
    positions ``s`` of ``W_o a_s + b_o`` (``a``: the original's pool input), so every position gives a row
    ``(h_s, W_o a_s + b_o)`` of a least-squares problem with the same unknowns and many more rows: the refit blends
    it in as a prior, weighted as the held-out error of the layer's own rows decides
    (:func:`graph_ops.least_squares.choose_refit`)."""
    producers = {out: n for n in original.graph.node for out in n.output}
    tensor = node.input[0]
    while tensor in producers and producers[tensor].op_type in SHAPE_ONLY:
        tensor = producers[tensor].input[0]
    pool = producers.get(tensor)
    if pool is None or pool.op_type != "GlobalAveragePool" or len(shapes.get(pool.input[0], ())) != 4:
        return None
    if shape.op_type == "Conv" and (shape.kernel != (1, 1) or shape.group != 1 or any(shape.pads)
                                    or any(s != 1 for s in shape.strides)):
        return None
    if shape.op_type == "MatMul" and len(shapes.get(node.input[0], ())) != 2:
        return None
    try:
        weight, bias = layer_weights(original, node)
        coef = coef_from_weights(LayerShape.of(node, tuple(weight.shape)), weight, bias)
    except PreconditionError:
        return None
    if coef.shape[0] != 1 or coef.shape[1] != shapes[pool.input[0]][1] + int(shape.intercept):
        return None  # not one channel per input feature (e.g. a Flatten of a pooled map larger than 1x1)
    if out_keep is not None:
        coef = coef[:, :, out_keep]
    full, kept = shapes[pool.input[0]], pruned_shapes.get(pool.input[0], ())
    size = (full[1], kept[1], full[2], full[3]) if len(kept) == 4 else None
    if size is not None and any(not isinstance(d, int) for d in size):
        size = None
    return Pooled(pool.input[0], pool.input[0], np.ascontiguousarray(coef), size)


def _design(layer: _Layer, x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
            positions: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Design rows ``(R, g, d)`` from the pruned input and targets ``(R, g, O_g)`` from the original output."""
    shape = layer.shape
    if shape.spatial:
        if x.ndim != 4 or y.ndim != 4:
            raise PreconditionError(f"{shape.op_type} '{layer.name}': input or output is not 4-D")
        image, oy, ox = sample_positions(x.shape[0], y.shape[2], y.shape[3], positions, rng)
        patches, targets = conv_patches(x, shape, image, oy, ox), y[image, :, oy, ox]
    else:
        if y.ndim != x.ndim or y.ndim < 2 or (y.ndim > 2 and shape.op_type != "MatMul"):
            raise PreconditionError(f"{shape.op_type} '{layer.name}': input {x.shape} and output {y.shape} are not "
                                    "rows of features (2-D, or a MatMul over the last axis)")
        if y.ndim > 2:  # a MatMul over the last axis (a transformer's Linear): every token is a row
            xs, ys = x.reshape(len(x), -1, x.shape[-1]), y.reshape(len(y), -1, y.shape[-1])
            image, token, _ = sample_positions(len(xs), xs.shape[1], 1, positions, rng)
            x, y = xs[image, token], ys[image, token]
        patches, targets = x.reshape(x.shape[0], 1, -1), y
    return _rows(layer, patches, targets)


def _rows(layer: _Layer, patches: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Design rows ``(R, g, d)`` and targets ``(R, g, O_g)`` (kept output channels only)."""
    if layer.out_keep is not None:  # only the sampled rows are sliced, never the whole output tensor
        targets = targets[:, layer.out_keep]
    return patch_rows(patches, layer.shape), targets.reshape(len(targets), layer.shape.group, -1)


class RefitLevel(LevelJob):
    """The least-squares refits of one level's layers: per layer, (fit, held-out) :class:`PatchMoments`.

    A Conv with static sizes reads only its sampled positions, gathered inside the graph
    (:class:`graph_ops.probes.PositionGather`): the original output at the positions, the pruned input at every tap
    of their patches (the positions are drawn before the batch runs, as :func:`_design` draws them, so the rows are
    the same). Other layers read whole tensors (:func:`_design`). Each layer's positions in a batch come from
    ``batch_rng(seed, level, batch, layer index)``.
    """

    def __init__(self, layers: Sequence[_Layer], out: onnx.ModelProto, *, ridge: float | None, seed: int,
                 level: int) -> None:
        """Plan the level: layer outputs from the original, layer inputs from the pruned model."""
        self.layers, self.out = list(layers), out
        self.alphas = REFIT_ALPHAS if ridge is None else (float(ridge),)
        self.specs: dict[str, tuple[PositionGather, PositionGather]] = {}
        for layer in self.layers:
            if layer.gather is not None:
                c_out, c_in = layer.gather[0], layer.gather[3]
                keep = None if layer.out_keep is None else tuple(int(c) for c in layer.out_keep)
                # taps may read nothing: Conv zero padding; a ConvTranspose tap of another phase or past the border
                reads_nothing = any(layer.shape.pads) or layer.shape.op_type == "ConvTranspose"
                mask = f"{layer.name}__refit_x_mask" if reads_nothing else None
                self.specs[layer.name] = (
                    PositionGather(layer.output, f"{layer.name}__refit_y_index", f"{layer.name}__refit_y",
                                   c_out if keep is None else len(keep), keep=keep),
                    PositionGather(layer.input, f"{layer.name}__refit_x_index", f"{layer.name}__refit_x", c_in,
                                   mask=mask))
        whole = [layer for layer in self.layers if layer.name not in self.specs]
        self.priors: dict[str, tuple[PositionGather, PositionGather]] = {}
        for layer in self.layers:
            if layer.pooled is not None and layer.pooled.size is not None:
                index = f"{layer.name}__prior_index"
                self.priors[layer.name] = (
                    PositionGather(layer.pooled.original, index, f"{layer.name}__prior_a", layer.pooled.size[0]),
                    PositionGather(layer.pooled.current, index, f"{layer.name}__prior_h", layer.pooled.size[1]))
        pooled = [layer.pooled for layer in self.layers if layer.pooled is not None and layer.name not in self.priors]
        self.original = tuple(dict.fromkeys([*(s[0] for s in self.specs.values()), *(x.output for x in whole),
                                             *(p[0] for p in self.priors.values()), *(p.original for p in pooled)]))
        self.current = tuple(dict.fromkeys([*(s[1] for s in self.specs.values()), *(x.input for x in whole),
                                            *(p[1] for p in self.priors.values()), *(p.current for p in pooled)]))
        self.seed, self.level = seed, level
        self.drawn: tuple[int, dict[str, np.ndarray]] | None = None  # the last batch's index inputs
        self.acc = self._fresh()

    def _fresh(self) -> dict[str, tuple[MomentSums, MomentSums]]:
        acc = {layer.name: (MomentSums(), MomentSums()) for layer in self.layers}  # (fit, held-out)
        acc.update({_prior_key(layer): (MomentSums(), MomentSums()) for layer in self.layers if layer.pooled})
        return acc

    def _rng(self, batch: int, layer: _Layer) -> np.random.Generator:
        return batch_rng(self.seed, self.level, batch, layer.index)

    def _prior_rng(self, batch: int, layer: _Layer) -> np.random.Generator:
        return batch_rng(self.seed, self.level, batch, layer.index, 1)

    def indices(self, batch: int, n: int) -> dict[str, np.ndarray]:
        """Every gathered layer's positions for a batch (the same whenever asked: drawn from the batch's rng)."""
        if self.drawn is not None and self.drawn[0] == batch:
            return self.drawn[1]
        picks = {}
        for layer in self.layers:
            if layer.gather is None:
                continue
            _, h, w, _, h_in, w_in = layer.gather
            _, oy, ox = sample_positions(n, h, w, layer.positions, self._rng(batch, layer))
            y_spec, x_spec = self.specs[layer.name]
            picks[y_spec.index] = (oy * w + ox).reshape(n, 1, -1).astype(np.int32)
            flat, inside = patch_index(layer.shape, h_in, w_in, oy, ox)
            picks[x_spec.index] = flat.reshape(n, 1, -1).astype(np.int32)
            if x_spec.mask is not None:
                picks[x_spec.mask] = inside.reshape(n, 1, -1).astype(np.float32)
        for layer in self.layers:
            if layer.name in self.priors:
                _, _, h, w = layer.pooled.size  # type: ignore[union-attr]
                _, oy, ox = sample_positions(n, h, w, layer.positions, self._prior_rng(batch, layer))
                picks[self.priors[layer.name][0].index] = (oy * w + ox).reshape(n, 1, -1).astype(np.int32)
        self.drawn = (batch, picks)
        return picks

    def add(self, batch: int, held: bool, original: Mapping[str, np.ndarray],
            current: Mapping[str, np.ndarray]) -> None:
        """Fold one batch: design rows from the pruned input, targets from the original output (layer order)."""
        for layer in self.layers:
            if layer.name in self.specs:
                y_spec, x_spec = self.specs[layer.name]
                # (N, kept outputs, P): the kept channels were gathered in the graph; both built in one pass
                targets = gathered_targets(original[y_spec.output], layer.shape.group)
                rows = gathered_rows(current[x_spec.output], layer.shape, int(np.prod(layer.shape.kernel)))
            else:
                rows, targets = _design(layer, current[layer.input], original[layer.output],
                                        self._rng(batch, layer), layer.positions)
            self.acc[layer.name][int(held)].add(rows, targets)
            if layer.name in self.priors:  # (N, C, P) gathered: rows of positions
                a_spec, h_spec = self.priors[layer.name]
                h, a = (np.moveaxis(values, 1, 2).reshape(-1, values.shape[1])
                        for values in (current[h_spec.output], original[a_spec.output]))
                rows, targets = _prior_design(layer, h, a)
                self.acc[_prior_key(layer)][int(held)].add(rows, targets)
            elif layer.pooled is not None:
                rows, targets = _prior_rows(layer, current[layer.pooled.current], original[layer.pooled.original],
                                            self._prior_rng(batch, layer))
                self.acc[_prior_key(layer)][int(held)].add(rows, targets)

    def take(self) -> dict[str, tuple[PatchMoments | None, PatchMoments | None]]:
        """Per layer, the (fit, held-out) moments folded since the last call."""
        part = {name: (fit.freeze(), held.freeze()) for name, (fit, held) in self.acc.items()}
        self.acc, self.drawn = self._fresh(), None
        return part

    def finish(self, moments: Any) -> tuple[list[Any], list[tuple[str, str]]]:
        """Choose, solve and write every layer of the level."""
        moments = moments or {}
        results = [_try_refit(self.out, layer, list(moments.get(layer.name, (None, None))), self.alphas,
                              moments.get(_prior_key(layer)) if layer.pooled is not None else None)
                   for layer in self.layers]
        return [r for r in results if isinstance(r, LayerRefit)], [r for r in results if isinstance(r, tuple)]


def _prior_key(layer: _Layer) -> str:
    return f"{layer.name}__prior"


def _prior_rows(layer: _Layer, h: np.ndarray, a: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A pooled layer's per-position rows ``[h_s; 1]`` and targets ``W_o [a_s; 1]`` (:class:`Pooled`) at up to
    ``layer.positions`` positions per image of the pool's input."""
    if h.ndim != 4 or a.ndim != 4 or h.shape[2:] != a.shape[2:]:
        raise PreconditionError(f"layer '{layer.name}': the pool inputs {h.shape} and {a.shape} do not match")
    image, oy, ox = sample_positions(h.shape[0], h.shape[2], h.shape[3], layer.positions, rng)
    return _prior_design(layer, h[image, :, oy, ox], a[image, :, oy, ox])


def _prior_design(layer: _Layer, h: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``(R, 1, C_kept [+ 1])`` from the pruned pool input's positions ``h`` ``(R, C_kept)``, targets
    ``(R, 1, O_kept)``: the original layer applied to the original's ``a`` ``(R, C)`` at the same positions."""
    one = LayerShape("Gemm", intercept=layer.shape.intercept)
    rows = patch_rows(np.asarray(h, PRODUCTS)[:, None], one)
    full = patch_rows(np.asarray(a, np.float64)[:, None], one)
    return rows, np.einsum("rgd,gdo->rgo", full, layer.pooled.coef)  # type: ignore[union-attr]


def _refit_one(model: onnx.ModelProto, layer: _Layer, fit: PatchMoments | None, held: PatchMoments | None,
               alphas: tuple[float, ...], prior: Any = None) -> LayerRefit:
    if fit is None:
        fit, held = held, None
    if fit is None:
        raise PreconditionError(f"layer '{layer.name}': no calibration rows")
    idx = node_index(model, layer.name)
    weight, bias = layer_weights(model, model.graph.node[idx])
    dim = fit.gram.shape[1]
    if fit.count < MIN_ROWS_PER_DIM * dim:
        # the held-out ridge choice and the keep-current guard bound the harm; fewer rows than unknowns is worth a
        # warning, fewer than the rule of thumb only a note
        level = logging.WARNING if fit.count < dim else logging.INFO
        logger.log(level, "layer '%s': %d calibration rows for %d unknowns per output (about %d advised); the ridge "
                   "chosen on held-out batches limits overfitting: more calibration samples may refit it better",
                   layer.name, fit.count, dim, MIN_ROWS_PER_DIM * dim)
    choice = choose_refit(fit, held, coef_from_weights(layer.shape, weight, bias), layer.shape.intercept, alphas,
                          prior)
    if choice.alpha is not None:
        new_weight, new_bias = weights_from_coef(layer.shape, choice.coef, tuple(weight.shape), weight.dtype)
        write_weights(model, idx, new_weight, new_bias)
    rows = fit.count + (held.count if held is not None else 0)
    return LayerRefit(layer.name, layer.shape.op_type, layer.input, rows, dim, choice.alpha, choice.error_before,
                      choice.error_after, choice.prior_weight)


def _try_refit(model: onnx.ModelProto, layer: _Layer, moments: list[PatchMoments | None],
               alphas: tuple[float, ...], prior: Any = None) -> LayerRefit | tuple[str, str]:
    """Refit one layer, or return (layer, reason) when its weights cannot take the refit."""
    try:
        return _refit_one(model, layer, moments[0], moments[1], alphas, prior)
    except PreconditionError as err:
        logger.warning("refit skipped layer '%s': %s", layer.name, err)
        return layer.name, str(err)


class _Skip(LevelJob):
    """Layers a level can neither refit nor regress: recorded with the reason, nothing read."""

    def __init__(self, skipped: list[tuple[str, str]]) -> None:
        self.skipped = skipped

    def add(self, batch: int, held: bool, original: Mapping[str, np.ndarray],
            current: Mapping[str, np.ndarray]) -> None:
        """Nothing to fold."""

    def finish(self, moments: Any) -> tuple[list[Any], list[tuple[str, str]]]:
        """The recorded skips."""
        return [], self.skipped


def lstsq_recovery(original: onnx.ModelProto, out: onnx.ModelProto, index: ChannelGroupIndex,
                   keep: Mapping[str, Sequence[int]], opts: Any) -> LevelPlan:
    """R3 over every affected layer, level by level when ``opts.sequential`` (one sweep over the data): the plan of
    the sweep (:func:`pipeline.recovery.worker.sweep_levels` runs it; its jobs rewrite ``out``).

    A layer with more than ``opts.refit_max_dim`` unknowns per output (say a Flatten -> Gemm head of 25,088 inputs,
    whose Gram matrix alone would take 5 GB) gets R2 instead, at its level, when it is a channel-map consumer.
    """
    layers, skipped = refit_targets(original, out, index, keep)
    levels = layer_levels(original, [layer.index for layer in layers]) if opts.sequential else [0] * len(layers)
    large = {layer.name for layer in layers if layer.dim > opts.refit_max_dim}
    maps: dict[str, MapTarget] = {}
    if large:  # consumer targets are needed only when some layer is too large for R3
        maps = {t.node: t for t in consumer_targets(original, index, keep)[0]}
    jobs: dict[int, list[LevelJob]] = {}
    for level in sorted(set(levels)):
        batch = [layer for layer, lvl in zip(layers, levels, strict=True) if lvl == level]
        level_jobs: list[LevelJob] = []
        too_large = [layer.name for layer in batch if layer.name in large]
        if too_large:
            level_jobs.append(MapLevel([maps[n] for n in too_large if n in maps], original, out, regress_solver,
                                       sequential=opts.sequential, ridge=opts.ridge,
                                       max_positions=opts.max_positions, seed=opts.seed, level=level))
            level_jobs.append(_Skip([(n, f"more than {opts.refit_max_dim} unknowns per output for R3 and not a "
                                         "channel-map consumer for R2; left as it is")
                                     for n in too_large if n not in maps]))
        fit = [layer for layer in batch if layer.name not in large]
        if fit:
            fit = [replace(layer, positions=refit_positions(opts.refit_positions, layer.dim, opts.samples))
                   for layer in fit]
            level_jobs.append(RefitLevel(fit, out, ridge=opts.ridge, seed=opts.seed, level=level))
        jobs[level] = level_jobs
    return LevelPlan(dict(zip((layer.index for layer in layers), levels, strict=True)), jobs, tuple(skipped),
                     opts.sequential)

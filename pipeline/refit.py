"""R3 (``lstsq``) recovery: refit the layers of a pruned model by least squares against the original's outputs.

Which layers: every Conv (any ``group``: depthwise and grouped layers are solved per group), Gemm and MatMul whose
input differs between the original and the pruned model, i.e. whose input lost channels or lies downstream of a
layer that did (so a layer behind a protected group still has the drift of its input corrected).

How (methods.md 6.2, R3; algebra in :mod:`graph_ops.refit`): layers are processed level by level from input to output
(:func:`pipeline.layerwise.layer_levels`); for each level, the calibration data is streamed through the ORIGINAL
model (the layer's output, restricted to the output channels the plan keeps, is the target) and the CURRENT pruned
model, in which every upstream layer is already refit (the layer's input: im2col patches of the kept channels at up
to ``positions`` seeded random output positions per image). Float64 moments ``Σ x̃x̃ᵀ``, ``Σ x̃yᵀ``, ``Σ y²`` are
streamed (every fifth batch held out); the ridge factor is chosen on the held-out batches, the layer's current
weights compete (a refit that does not lower the held-out error is not applied) and the winner is refit on all
batches and written into the layer's weight and bias. With ``sequential=False`` every layer is fitted in one data
pass on the pruned model before any refit (faster, no error-accumulation correction). Cost per layer: about
``rows * dim²`` for the moments and ``dim³`` for each solve, memory ``8 dim²`` bytes per group; layers above
``max_dim`` unknowns go to a fallback (R2 in :func:`pipeline.recover.lstsq_recovery`).

The graph's structure and interface never change: only weight and bias initializers are replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from graph_ops.channels import analyze, node_name
from graph_ops.errors import PreconditionError
from graph_ops.groups import ChannelGroupIndex
from graph_ops.prune import check_index, kept_indices
from graph_ops.recover import write_weights
from graph_ops.refit import (
    REFIT_ALPHAS,
    REFIT_OPS,
    LayerShape,
    PatchMoments,
    accumulate,
    choose_refit,
    coef_from_weights,
    conv_patches,
    layer_weights,
    patch_rows,
    sample_positions,
    weights_from_coef,
)
from pipeline.layerwise import MIN_ROWS_PER_DIM, layer_levels, level_progress, node_by_name, stream_pairs

logger = logging.getLogger(__name__)

Fallback = Callable[[Sequence[str]], tuple[list[Any], list[tuple[str, str]]]]



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


@dataclass(frozen=True)
class _Layer:
    name: str
    index: int  # in the original graph (levels)
    input: str
    output: str
    out_keep: np.ndarray | None  # original output channels the pruned layer keeps (None: all)
    shape: LayerShape  # of the pruned layer
    dim: int  # unknowns per output: rows of the per-group Gram matrix


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
    """The layers to refit (topological order) and the skipped ones with a reason."""
    fresh = analyze(original)
    check_index(index, fresh)
    plan = fresh.validate_keep(keep)
    changed = _changed_tensors(original, fresh, plan)
    layers: list[_Layer] = []
    skipped: list[tuple[str, str]] = []
    for idx, node in enumerate(original.graph.node):
        if node.op_type not in (*REFIT_OPS, "ConvTranspose") or not node.input or node.input[0] not in changed:
            continue
        name = node_name(node, idx)
        try:
            target = node_by_name(pruned, name)
            weight, _ = layer_weights(pruned, target)
            shape = LayerShape.of(target, tuple(weight.shape))
        except PreconditionError as err:
            skipped.append((name, f"{err}; left as it is"))
            continue
        segs = fresh.by_tensor.get(node.output[0], ())
        out_keep = kept_indices(segs, dict(plan)) if segs else None
        if out_keep is not None and out_keep.size == sum(s.length for s in segs):
            out_keep = None
        layers.append(_Layer(name, idx, node.input[0], node.output[0], out_keep, shape, shape.dim(weight.shape)))
    return layers, skipped


def _design(layer: _Layer, x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
            positions: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Design rows ``(R, g, d)`` from the pruned input and targets ``(R, g, O_g)`` from the original output."""
    shape = layer.shape
    if shape.op_type == "Conv":
        if x.ndim != 4 or y.ndim != 4:
            raise PreconditionError(f"Conv '{layer.name}': input or output is not 4-D")
        image, oy, ox = sample_positions(x.shape[0], y.shape[2], y.shape[3], positions, rng)
        patches, targets = conv_patches(x, shape, image, oy, ox), y[image, :, oy, ox]
    else:
        if y.ndim != 2:
            raise PreconditionError(f"{shape.op_type} '{layer.name}': only 2-D inputs and outputs are refit")
        patches, targets = x.reshape(x.shape[0], 1, -1), y
    if layer.out_keep is not None:  # only the sampled rows are sliced, never the whole output tensor
        targets = targets[:, layer.out_keep]
    return patch_rows(patches, shape), targets.reshape(len(targets), shape.group, -1)


def collect_patch_moments(original: onnx.ModelProto, current: onnx.ModelProto, layers: Sequence[_Layer],
                          dataset: Any, *, positions: int | None = 64, seed: int = 0,
                          **session: Any) -> dict[str, tuple[PatchMoments | None, PatchMoments | None]]:
    """Per layer, (fit, held-out) moments of its refit problem, from one pass over ``dataset``.

    ``session`` takes :func:`pipeline.layerwise.stream_pairs` options (batch_size, backend, intra_op_threads).
    """
    outs = sorted({layer.output for layer in layers})
    ins = sorted({layer.input for layer in layers})
    rng = np.random.default_rng(seed)
    acc: dict[str, list[PatchMoments | None]] = {layer.name: [None, None] for layer in layers}
    for held, original_values, current_values in stream_pairs(original, outs, current, ins, dataset, **session):
        for layer in layers:
            rows, targets = _design(layer, current_values[ins.index(layer.input)],
                                    original_values[outs.index(layer.output)], rng, positions)
            part = acc[layer.name]
            moments = accumulate(rows, targets)
            part[int(held)] = moments if part[int(held)] is None else part[int(held)].merge(moments)
    return {name: (fit, held) for name, (fit, held) in acc.items()}


def _refit_one(model: onnx.ModelProto, layer: _Layer, fit: PatchMoments | None, held: PatchMoments | None,
               alphas: tuple[float, ...]) -> LayerRefit:
    if fit is None:
        fit, held = held, None
    if fit is None:
        raise PreconditionError(f"layer '{layer.name}': no calibration rows")
    node = node_by_name(model, layer.name)
    weight, bias = layer_weights(model, node)
    dim = fit.gram.shape[1]
    if fit.count < MIN_ROWS_PER_DIM * dim:
        # the held-out ridge choice and the keep-current guard bound the harm; fewer rows than unknowns is worth a
        # warning, fewer than the rule of thumb only a note
        level = logging.WARNING if fit.count < dim else logging.INFO
        logger.log(level, "layer '%s': %d calibration rows for %d unknowns per output (about %d advised); the ridge "
                   "chosen on held-out batches limits overfitting: more calibration samples may refit it better",
                   layer.name, fit.count, dim, MIN_ROWS_PER_DIM * dim)
    choice = choose_refit(fit, held, coef_from_weights(layer.shape, weight, bias), layer.shape.intercept, alphas)
    if choice.alpha is not None:
        new_weight, new_bias = weights_from_coef(layer.shape, choice.coef, tuple(weight.shape), weight.dtype)
        write_weights(model, node, new_weight, new_bias)
    rows = fit.count + (held.count if held is not None else 0)
    return LayerRefit(layer.name, layer.shape.op_type, layer.input, rows, dim, choice.alpha, choice.error_before,
                      choice.error_after)


def refit_model(original: onnx.ModelProto, out: onnx.ModelProto, index: ChannelGroupIndex,
                keep: Mapping[str, Sequence[int]], dataset: Any, *, sequential: bool = True,
                ridge: float | None = None, positions: int | None = 64, seed: int = 0, progress: bool = False,
                max_dim: int | None = None, fallback: Fallback | None = None,
                **session: Any) -> tuple[list[Any], list[tuple[str, str]]]:
    """Refit the affected layers of ``out`` (the pruned model, rewritten in place); see the module docstring.

    Args:
        max_dim: layers with more unknowns per output than this (their Gram matrix takes ``8 dim²`` bytes per group)
            are not refit here: at their level they go to ``fallback`` (their names), or are skipped.
        fallback: ``names -> (done, skipped)``, another recovery for the too-large layers of one level.
        session: :func:`pipeline.layerwise.stream_pairs` options (batch_size, backend, intra_op_threads).

    Returns:
        What was done per layer (:class:`LayerRefit`, or the fallback's records), and the layers skipped with a
        reason.
    """
    layers, skipped = refit_targets(original, out, index, keep)
    alphas = REFIT_ALPHAS if ridge is None else (float(ridge),)
    levels = layer_levels(original, [layer.index for layer in layers]) if sequential else [0] * len(layers)
    done: list[Any] = []
    for level in level_progress(levels, progress):
        batch = [layer for layer, lvl in zip(layers, levels, strict=True) if lvl == level]
        large = [layer.name for layer in batch if max_dim is not None and layer.dim > max_dim]
        batch = [layer for layer in batch if layer.name not in large]
        if large:
            got, missed = fallback(large) if fallback is not None else ([], [(n, f"more than {max_dim} unknowns "
                                                                            "per output; left as it is")
                                                                           for n in large])
            done += got
            skipped += missed
        if not batch:
            continue
        moments = collect_patch_moments(original, out, batch, dataset, positions=positions, seed=seed + level,
                                        **session)
        results = [_try_refit(out, layer, moments[layer.name], alphas) for layer in batch]
        done += [r for r in results if isinstance(r, LayerRefit)]
        skipped += [r for r in results if isinstance(r, tuple)]
    return done, skipped


def _try_refit(model: onnx.ModelProto, layer: _Layer, moments: tuple[PatchMoments | None, PatchMoments | None],
               alphas: tuple[float, ...]) -> LayerRefit | tuple[str, str]:
    """Refit one layer, or return (layer, reason) when its weights cannot take the refit."""
    try:
        return _refit_one(model, layer, *moments, alphas)
    except PreconditionError as err:
        logger.warning("refit skipped layer '%s': %s", layer.name, err)
        return layer.name, str(err)

"""R1 / R2 recovery algebra: a linear map of a consumer's removed input channels, folded into its weights
(methods.md 6.2; the driver is :mod:`pipeline.recovery.maps`).

A consumer ``Q`` (Conv, ConvTranspose, Gemm, MatMul) reads an input whose channel axis holds ``C`` channels; a plan
keeps the set ``K`` and removes ``R``. Write the consumer weight with its input-channel axis first as
``Wc[c, p, o, t]``: channel ``c``, position ``p`` (``P = H*W`` column blocks of a Gemm after Flatten, else ``P = 1``),
output ``o`` and kernel taps ``t``. The consumer's statistics (:class:`ChannelMoments`) are channel vectors
``a[:, p]`` seen ``n`` times per position: ``sums[c, p] = Σ a[c, p]`` and the Gram ``G = Σ_{samples, p} a aᵀ``.

A recovery is a linear model of the removed channels from the kept ones at the same position,
``a_R[p] ≈ B a_K[p] + β[:, p]`` (``B`` shared over positions, ``β`` per position), folded into the consumer:

* ``Wc'[k, p] = Wc[k, p] + Σ_r B[r, k] Wc[r, p]``  (kept slices absorb the removed ones),
* ``b'_o = b_o + Σ_{r, p, t} Wc[r, p, o, t] β[r, p]`` (times ``alpha / beta`` of a Gemm).

R1 (mean-bias) is ``B = 0``, ``β = μ_R`` (per-position means for a Gemm after Flatten, one mean per channel for a
Conv). R2 (regression) solves the ridge least squares on the within-position covariance
``S = G - n Σ_p μ_p μ_pᵀ``: ``B = S_RK (S_KK + λI)^{-1}``, ``λ = α tr(S_KK)/|K|``, and ``β_p = μ_{R,p} - B μ_{K,p}``.
This is the ``[a; 1]`` Gram formulation of methods.md with the intercept left unpenalised and, for Gemm, one intercept
per position (each position has its own weight columns, so this is exactly representable).

Drift (error-accumulation correction, He et al. 2017): when earlier layers were pruned too, the consumer sees kept
channels ``z`` that differ from the original ``a_K``. :class:`CrossMoments` of ``(a, z)`` give the general map
``a ≈ F z + f`` (``F``: ``(C, |K|)``): R1 with drift is ``F = E`` (the embedding of ``K``), ``f_p = μa_p - E μz_p``;
R2 with drift regresses the residual ``a - E z`` on ``z`` (ridge shrinks towards ``F = E``). With ``z = a_K`` both
reduce exactly to the R1 / R2 fills above (tested); :func:`fold_map` folds ``Wc'[k] = Σ_c F[c, k] Wc[c]``,
``δ_o = Σ_{c,p,t} Wc[c,p,o,t] f[c,p]``. :class:`LinearFill` and its solvers are the spec formulas of methods.md
6.2; the pipeline uses the map form for both modes.

Preconditions: the consumer is dense over channels (``group = 1``); grouped / depthwise consumers are not handled
here (callers skip them). For a Conv, zero padding makes border taps see 0 instead of the modelled value: the bias
term is slightly off there (as documented in methods.md). No onnxruntime, no pipeline import: pure numpy + onnx.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graph_ops.errors import PreconditionError
from graph_ops.proto import attr, write_weights

ALPHAS = (1e-4, 1e-3, 1e-2)


@dataclass(frozen=True)
class ChannelMoments:
    """Streaming moments of a consumer's input channels (float64, read-only arrays).

    Attributes:
        count: vectors per position (samples, times sampled pixels for a Conv input).
        sums: ``(C, P)`` sum of each channel at each position.
        gram: ``(C, C)`` uncentred Gram summed over samples and positions.
    """

    count: int
    sums: np.ndarray
    gram: np.ndarray

    def __post_init__(self) -> None:
        for arr in (self.sums, self.gram):
            arr.setflags(write=False)

    @property
    def mean(self) -> np.ndarray:
        """``(C, P)`` per-position channel means."""
        return self.sums / max(self.count, 1)

    @property
    def scatter(self) -> np.ndarray:
        """``(C, C)`` within-position scatter ``G - n Σ_p μ_p μ_pᵀ``."""
        mu = self.mean
        return self.gram - self.count * (mu @ mu.T)

    def merge(self, other: ChannelMoments) -> ChannelMoments:
        """Moments of both sample sets together."""
        return ChannelMoments(self.count + other.count, self.sums + other.sums, self.gram + other.gram)


@dataclass(frozen=True)
class ChannelMap:
    """``a ≈ F z + f``: the full input ``a`` (``C`` channels) from the kept channels ``z`` (``F``: ``(C, |K|)``,
    ``offset`` f: ``(C, P)``); ``alpha`` the ridge factor used, if any."""

    matrix: np.ndarray
    offset: np.ndarray
    alpha: float | None = None


@dataclass(frozen=True)
class LinearFill:
    """``a_R ≈ B a_K + β``: ``B`` is ``(|R|, |K|)``, ``beta`` is ``(|R|, P)``; ``alpha`` the ridge factor used."""

    coef: np.ndarray
    beta: np.ndarray
    alpha: float | None = None

    def as_map(self, channels: int, kept: np.ndarray) -> ChannelMap:
        """The same model as a :class:`ChannelMap` (kept channels map to themselves)."""
        removed = np.setdiff1d(np.arange(channels), kept)
        matrix = np.zeros((channels, kept.size))
        matrix[kept, np.arange(kept.size)] = 1.0
        matrix[removed] = self.coef
        offset = np.zeros((channels, self.beta.shape[1]))
        offset[removed] = self.beta
        return ChannelMap(matrix, offset, self.alpha)


def bias_fill(moments: ChannelMoments, kept: np.ndarray, removed: np.ndarray) -> LinearFill:
    """R1: removed channels replaced by their (per-position) means."""
    return LinearFill(np.zeros((removed.size, kept.size)), moments.mean[removed].copy())


def regress_fill(moments: ChannelMoments, kept: np.ndarray, removed: np.ndarray, alpha: float) -> LinearFill:
    """R2: ridge regression of removed channels on kept ones (see the module docstring)."""
    scatter = moments.scatter
    s_kk = scatter[np.ix_(kept, kept)]
    lam = alpha * max(float(np.trace(s_kk)) / max(kept.size, 1), 1e-12)
    rhs = scatter[np.ix_(kept, removed)]
    coef = np.linalg.solve(s_kk + lam * np.eye(kept.size), rhs).T
    mu = moments.mean
    return LinearFill(coef, mu[removed] - coef @ mu[kept], alpha)


def fill_error(moments: ChannelMoments, kept: np.ndarray, removed: np.ndarray, fill: LinearFill | None) -> float:
    """``Σ ||a_R - B a_K - β||²`` over the samples the moments describe (``fill=None``: plain removal, ``Σ ||a_R||²``).

    With ``M = [I_R, -B]``: ``tr(M G Mᵀ) - 2 Σ_p β_pᵀ M s_p + n Σ_p ||β_p||²``.
    """
    mix = np.zeros((removed.size, moments.gram.shape[0]))
    mix[:, removed] = np.eye(removed.size)
    if fill is None:
        return float(np.trace(mix @ moments.gram @ mix.T))
    mix[:, kept] = -fill.coef
    quad = float(np.trace(mix @ moments.gram @ mix.T))
    cross = float(np.sum(fill.beta * (mix @ moments.sums)))
    return quad - 2.0 * cross + moments.count * float(np.sum(fill.beta**2))


def select_regress(fit: ChannelMoments, held_out: ChannelMoments | None, kept: np.ndarray, removed: np.ndarray,
                   alphas: tuple[float, ...] = ALPHAS) -> LinearFill:
    """R2 with ``α`` chosen on held-out moments by reconstruction error of ``a_R``, then refit on all moments."""
    if held_out is None or held_out.count == 0 or len(alphas) == 1:
        return regress_fill(fit if held_out is None else fit.merge(held_out), kept, removed, alphas[len(alphas) // 2])
    errors = [fill_error(held_out, kept, removed, regress_fill(fit, kept, removed, a)) for a in alphas]
    best = alphas[int(np.argmin(errors))]
    return regress_fill(fit.merge(held_out), kept, removed, best)


@dataclass(frozen=True)
class CrossMoments:
    """Joint moments of a consumer input in the original model (``a``, ``C`` channels) and in the partly recovered
    pruned model (``z``, the ``|K|`` kept channels), at the same samples and positions (float64, read-only)."""

    count: int
    sums_a: np.ndarray  # (C, P)
    sums_z: np.ndarray  # (K, P)
    gram_a: np.ndarray  # (C, C)
    gram_z: np.ndarray  # (K, K)
    cross: np.ndarray  # (C, K): Σ a zᵀ

    def __post_init__(self) -> None:
        for arr in (self.sums_a, self.sums_z, self.gram_a, self.gram_z, self.cross):
            arr.setflags(write=False)

    def merge(self, other: CrossMoments) -> CrossMoments:
        """Moments of both sample sets together."""
        return CrossMoments(self.count + other.count, self.sums_a + other.sums_a, self.sums_z + other.sums_z,
                            self.gram_a + other.gram_a, self.gram_z + other.gram_z, self.cross + other.cross)


def _embed(channels: int, kept: np.ndarray) -> np.ndarray:
    embed = np.zeros((channels, kept.size))
    embed[kept, np.arange(kept.size)] = 1.0
    return embed


def drift_mean(moments: CrossMoments, kept: np.ndarray) -> ChannelMap:
    """R1 with drift: ``F = E`` (kept channels as they are), ``f_p = μa_p - E μz_p`` (means of every channel)."""
    n = max(moments.count, 1)
    embed = _embed(moments.sums_a.shape[0], kept)
    return ChannelMap(embed, moments.sums_a / n - embed @ (moments.sums_z / n))


def drift_regress(moments: CrossMoments, kept: np.ndarray, alpha: float) -> ChannelMap:
    """R2 with drift: ridge regression of the residual ``a - E z`` on ``z`` (shrinks towards ``F = E``)."""
    n = max(moments.count, 1)
    mu_a, mu_z = moments.sums_a / n, moments.sums_z / n
    embed = _embed(mu_a.shape[0], kept)
    s_zz = moments.gram_z - n * (mu_z @ mu_z.T)
    s_tz = moments.cross - n * (mu_a @ mu_z.T) - embed @ s_zz
    lam = alpha * max(float(np.trace(s_zz)) / max(kept.size, 1), 1e-12)
    matrix = embed + np.linalg.solve(s_zz + lam * np.eye(kept.size), s_tz.T).T
    return ChannelMap(matrix, mu_a - matrix @ mu_z, alpha)


def map_error(moments: CrossMoments, cmap: ChannelMap) -> float:
    """``Σ ||a - F z - f||²`` over the samples the moments describe."""
    f, mat = cmap.offset, cmap.matrix
    quad = (np.trace(moments.gram_a) - 2.0 * np.sum(mat * moments.cross) + np.sum(mat * (mat @ moments.gram_z)))
    resid = moments.sums_a - mat @ moments.sums_z
    return float(quad - 2.0 * np.sum(f * resid) + moments.count * np.sum(f**2))


def select_drift(fit: CrossMoments, held_out: CrossMoments | None, kept: np.ndarray,
                 alphas: tuple[float, ...] = ALPHAS) -> ChannelMap:
    """R2 with drift, ``α`` chosen on held-out moments by ``map_error``, then refit on all moments.

    The mean-only map (:func:`drift_mean`, the limit ``α → ∞``) competes too: when no ``α`` beats it on held-out
    data (too few samples for the ``|K|``-dimensional regression), it is returned (``alpha=None``).
    """
    if held_out is None or held_out.count == 0 or len(alphas) == 1:
        return drift_regress(fit if held_out is None else fit.merge(held_out), kept, alphas[len(alphas) // 2])
    errors = [map_error(held_out, drift_regress(fit, kept, a)) for a in alphas]
    merged = fit.merge(held_out)
    if min(errors) >= map_error(held_out, drift_mean(fit, kept)):
        return drift_mean(merged, kept)
    return drift_regress(merged, kept, alphas[int(np.argmin(errors))])


def fold_fill(weight: np.ndarray, axis: int, block: int, kept: np.ndarray, fill: LinearFill) -> tuple[np.ndarray,
                                                                                                         np.ndarray]:
    """Fold a fill of the removed channels into the consumer weight (see :func:`fold_map`)."""
    channels = weight.shape[axis] // block
    return fold_map(weight, axis, block, kept, fill.as_map(channels, kept))


def fold_map(weight: np.ndarray, axis: int, block: int, kept: np.ndarray, cmap: ChannelMap) -> tuple[np.ndarray,
                                                                                                       np.ndarray]:
    """Fold ``a ≈ F z + f`` into the consumer: ``Wc'[k] = Σ_c F[c, k] Wc[c]``, ``δ_o = Σ_{c,p,t} Wc[c,p,o,t] f[c,p]``.

    Args:
        weight: the ORIGINAL (unpruned) consumer weight.
        axis: its input-channel axis (Conv 1, ConvTranspose 0, Gemm K axis).
        block: entries per channel along ``axis`` (``H*W`` after Flatten, else 1).
        kept: sorted kept channel indices of the consumer input.
        cmap: the channel map (``F`` has one column per kept channel).

    Returns:
        The pruned weight (kept slices only, in sorted order) and the bias delta ``(O,)`` (before Gemm alpha/beta).
    """
    moved = np.moveaxis(weight.astype(np.float64), axis, 0)
    channels = moved.shape[0] // block
    if channels * block != moved.shape[0] or moved.ndim < 2 or cmap.matrix.shape != (channels, kept.size):
        raise PreconditionError(f"consumer weight of shape {weight.shape} does not hold {block}-entry channel "
                                f"blocks along axis {axis} for a map of shape {cmap.matrix.shape}")
    wc = moved.reshape(channels, block, moved.shape[1], -1)
    delta = np.einsum("cp,cpot->o", cmap.offset, wc)
    new_kept = np.einsum("ck,cpot->kpot", cmap.matrix, wc)
    new = new_kept.reshape((kept.size * block, *moved.shape[1:]))
    return np.moveaxis(new, 0, axis).astype(weight.dtype), delta


def write_consumer(model: onnx.ModelProto, idx: int, weight: np.ndarray, delta: np.ndarray) -> None:
    """Write a recovered weight and add ``delta`` to the bias of node ``idx`` of ``model``, in place.

    A Gemm's delta is scaled by ``alpha / beta``; a missing bias is created (Conv, ConvTranspose, Gemm); see
    :func:`graph_ops.proto.write_weights`.

    Raises:
        PreconditionError: the weight or bias is not an initializer, a shape mismatch, or a MatMul that would need
            a bias (callers record it and skip).
    """
    node = model.graph.node[idx]
    inits = {t.name: t for t in model.graph.initializer}
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if node.op_type == "MatMul" or (has_bias and node.input[2] not in inits):
        raise PreconditionError(f"consumer '{node.name}' ({node.op_type}) has no writable bias")
    if node.op_type == "Gemm":
        delta = delta * float(attr(node, "alpha", 1.0)) / float(attr(node, "beta", 1.0))  # type: ignore[arg-type]
    bias = numpy_helper.to_array(inits[node.input[2]]) if has_bias else np.zeros(delta.shape, weight.dtype)
    if bias.size != delta.size:
        raise PreconditionError(f"consumer '{node.name}': bias of shape {bias.shape} is not per output channel")
    write_weights(model, idx, weight, (bias + delta.reshape(bias.shape)).astype(bias.dtype))

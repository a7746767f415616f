"""R3 algebra: refit a layer by least squares on sampled im2col patches of its (pruned) input (methods.md 6.2, R3;
the driver is :mod:`pipeline.recovery.refit`).

A layer ``Q`` (Conv or ConvTranspose with any ``group``, Gemm, MatMul with a constant weight) computes, at every
output position, ``y = Wᵀ x̃`` per group, with ``x̃ = [vec(patch of the input); 1]`` (``d = C_g k_h k_w + 1`` entries:
the input channels of one group under the kernel, then the intercept; a Gemm / MatMul has ``P = 1`` "position" per
sample and no kernel, a MatMul has no intercept).

ConvTranspose (weight ``[C_in, C_out / g, k_h, k_w]``, strides ``s``, dilations ``δ``, pads ``(p_t, p_l, ...)``)
scatters every input pixel ``(i, j)`` through every tap ``(u, v)`` to the output position
``(i s_h + u δ_h - p_t, j s_w + v δ_w - p_l)``. Gathered per output position ``(o_y, o_x)`` instead, its output is

    ``y[o, o_y, o_x] = b_o + Σ_{c, u, v} x[c, (o_y + p_t - u δ_h) / s_h, (o_x + p_l - v δ_w) / s_w] W[c, o, u, v]``

where a tap contributes only when both divisions are exact and land inside the input (``output_padding`` only
lengthens the output). So it is linear in ``W`` with the same kind of patch: the input channel of the group times
the ``k_h k_w`` taps, a tap being 0 when it does not reach that output position (for stride 2 and a 2x2 kernel, one
tap per phase: four independent 1x1 maps interleaved). The refit below is therefore the same least squares, with the
transposed tap coordinates (:func:`tap_coordinates`) and the coefficient ``(c, u, v) x o`` read from
``W[c, o, u, v]`` (:func:`coef_from_weights`). Given patches ``x̃`` of the PRUNED model's input (its kept channels, drift of
earlier layers included) and targets ``y`` = the ORIGINAL model's output at the same sample and position (restricted
to the output channels the plan keeps), the refit solves, per group,

    ``min_W Σ ||y - Wᵀ x̃||² + λ ||W_{:-1}||²``   i.e.   ``(G + λ D) W = H``,

with the streamed moments ``G = Σ x̃ x̃ᵀ`` (``d x d``), ``H = Σ x̃ yᵀ`` (``d x O_g``), ``D`` the identity without the
intercept entry (the intercept is not penalised) and ``λ = α tr(G_xx) / (d - 1)``. The held-out error of any ``W`` is
``Σ||y||² - 2 tr(Wᵀ H) + tr(Wᵀ G W)`` (:func:`patch_error`), so ``α`` is chosen on held-out moments, the layer's
current weights compete (a refit that does not lower the held-out error is not applied), and the winner is refit on
all moments. A Gemm ``y = alpha A B' + beta C`` is solved for ``W = alpha B'`` and intercept ``beta C``.

Positions are subsampled per image (He et al. 2017 and ThiNet do the same); memory is ``O(g d² + g d O_g)`` whatever
the number of samples. Zero padding is modelled exactly (padded taps are zeros in the patch), so unlike R1 / R2 the
border positions are fitted too. This module is pure numpy + onnx (no onnxruntime, no pipeline import).

Precision. The rows of one batch are float32 (the activations onnxruntime returns) and their products ``Σ x̃ x̃ᵀ``,
``Σ x̃ yᵀ`` are computed in float32 (BLAS ssyrk / sgemm, about twice the speed of float64 products of float64
copies, half the memory) on the rows shifted by their batch mean ``s``; the shift is added back exactly in float64
(``Σ x yᵀ = Σ (x - s)(y - t)ᵀ + S tᵀ + s Tᵀ - n s tᵀ``, :func:`products`), and the sums across batches, the solves
and the errors of :func:`patch_error` are float64 (:data:`PRODUCTS`). The rounding of one batch's product (a few
thousand rows) is then about ``sqrt(R) 2⁻²⁴`` of the rows' spread, not of their offset: without the shift, the
float32 products of rows whose mean is ten times their spread moved the ridge solution at ``α = 1e-4`` by 100 %
of its size, with it by 2e-5 (``tests/unit/graph_ops/test_least_squares.py``; recovered models against the
float64 path: ``benchmarks/recovery_precision.py``). A batch whose float32 products are not finite (activations
beyond about 1e19) is folded in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from graph_ops.errors import PreconditionError
from graph_ops.proto import attrs as node_attrs

REFIT_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1)
PRODUCTS = np.float32
"""dtype of one batch's rows and products (module docstring, Precision); sums across batches are float64."""
REFIT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerShape:
    """How a layer reads its input: kernel geometry (``kernel == ()`` for Gemm / MatMul) and group count."""

    op_type: str
    group: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # (top, left, bottom, right)
    dilations: tuple[int, ...] = ()
    intercept: bool = True
    alpha: float = 1.0  # Gemm
    beta: float = 1.0  # Gemm
    trans_b: bool = False  # Gemm

    @property
    def spatial(self) -> bool:
        """A 2-D convolution (Conv or ConvTranspose): rows are output positions with patches of the input."""
        return self.op_type in ("Conv", "ConvTranspose")

    def dim(self, weight_shape: tuple[int, ...]) -> int:
        """Unknowns per output (rows of the per-group Gram matrix) for a weight of this shape."""
        if self.op_type == "Conv":
            inputs = int(np.prod(weight_shape[1:]))
        elif self.op_type == "ConvTranspose":  # weight [C_in, C_out / g, kh, kw]: C_in / g channels per group
            inputs = weight_shape[0] // self.group * int(np.prod(weight_shape[2:]))
        else:
            inputs = int(weight_shape[1] if self.trans_b else weight_shape[0])
        return inputs + int(self.intercept)

    @classmethod
    def of(cls, node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> LayerShape:
        """The shape of ``node`` (with its weight's shape).

        Raises:
            PreconditionError: a layer this refit does not model (callers record it and leave the layer as it is).
        """
        attrs = node_attrs(node)
        if node.op_type in ("Conv", "ConvTranspose"):
            if len(weight_shape) != 4:
                raise PreconditionError(f"{node.op_type} '{node.name}': only 2-D convolutions are refit")
            if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise PreconditionError(f"{node.op_type} '{node.name}': auto_pad is not modelled (canonical models "
                                        "use pads)")
            if "output_shape" in attrs:
                raise PreconditionError(f"ConvTranspose '{node.name}': output_shape (implicit pads) is not modelled")
            kernel = tuple(int(k) for k in weight_shape[2:])
            return cls(node.op_type, int(attrs.get("group", 1)), kernel, tuple(attrs.get("strides", (1, 1))),
                       tuple(attrs.get("pads", (0, 0, 0, 0))), tuple(attrs.get("dilations", (1, 1))))
        if node.op_type == "Gemm":
            if attrs.get("transA", 0) or float(attrs.get("beta", 1.0)) == 0.0:
                raise PreconditionError(f"Gemm '{node.name}' with transA=1 or beta=0 is not refit")
            return cls("Gemm", alpha=float(attrs.get("alpha", 1.0)), beta=float(attrs.get("beta", 1.0)),
                       trans_b=bool(attrs.get("transB", 0)))
        if node.op_type == "MatMul":
            return cls("MatMul", intercept=False)
        raise PreconditionError(f"{node.op_type} '{node.name}' is not refit (only {', '.join(REFIT_OPS)})")


def sample_positions(n: int, rows: int, cols: int, per_image: int | None,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, oy, ox)`` of up to ``per_image`` distinct output positions per image (all when None or enough)."""
    total = rows * cols
    if per_image is None or per_image >= total:
        flat = np.tile(np.arange(total), n)
        image = np.repeat(np.arange(n), total)
    else:
        flat = np.argsort(rng.random((n, total)), axis=1)[:, :per_image].ravel()
        image = np.repeat(np.arange(n), per_image)
    return image, flat // cols, flat % cols


def tap_coordinates(shape: LayerShape, height: int, width: int, oy: np.ndarray,
                    ox: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Input coordinates of every tap of the patches at output positions ``(oy, ox)`` of a ``height x width`` input,
    and whether the tap reads the input: ``iy`` ``(R, kh, 1)``, ``ix`` ``(R, 1, kw)``, ``inside`` ``(R, kh, kw)``.

    Conv: ``iy = oy s + u δ - p_t`` (a tap in the zero padding is outside). ConvTranspose (module docstring):
    ``iy = (oy + p_t - u δ) / s`` when the division is exact, else the tap does not reach ``oy``. Outside taps point
    at coordinate 0."""
    (kh, kw), (sh, sw), (dh, dw) = shape.kernel, shape.strides, shape.dilations
    top, left = shape.pads[0], shape.pads[1]
    if shape.op_type == "ConvTranspose":
        ry = oy[:, None] + top - np.arange(kh) * dh
        rx = ox[:, None] + left - np.arange(kw) * dw
        ok_y, ok_x = ry % sh == 0, rx % sw == 0
        iy, ix = ry // sh, rx // sw
    else:
        iy = oy[:, None] * sh + np.arange(kh) * dh - top
        ix = ox[:, None] * sw + np.arange(kw) * dw - left
        ok_y, ok_x = np.ones(iy.shape, bool), np.ones(ix.shape, bool)
    ok_y &= (iy >= 0) & (iy < height)
    ok_x &= (ix >= 0) & (ix < width)
    inside = ok_y[:, :, None] & ok_x[:, None, :]
    return np.where(ok_y, iy, 0)[:, :, None], np.where(ok_x, ix, 0)[:, None, :], inside


def conv_patches(x: np.ndarray, shape: LayerShape, image: np.ndarray, oy: np.ndarray, ox: np.ndarray) -> np.ndarray:
    """``(R, group, C_g * kh * kw)`` input patches of a 2-D Conv or ConvTranspose at output positions
    ``(image, oy, ox)``.

    The patch of one group is flattened in ``(C_g, kh, kw)`` order (the Conv weight's; a ConvTranspose's
    coefficients are laid out to match, :func:`coef_from_weights`); taps that read no input (zero padding, or a
    ConvTranspose tap of another phase) are zeros.
    """
    iy, ix, inside = tap_coordinates(shape, x.shape[2], x.shape[3], oy, ox)
    chans = np.arange(x.shape[1])
    patches = x[image[:, None, None, None], chans[None, :, None, None], iy[:, None], ix[:, None]]
    patches = patches * inside[:, None]
    return patches.reshape(len(image), shape.group, -1)


def patch_index(shape: LayerShape, height: int, width: int, oy: np.ndarray,
                ox: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions in the (unpadded) ``height x width`` input of every tap of the patches at output positions
    ``(oy, ox)``, and the mask of taps that read the input: ``(R, kh * kw)`` each, taps row-major. A tap that reads
    nothing points at position 0 with mask 0 (what :func:`graph_ops.probes.add_position_gathers` reads, so that the
    gathered, masked patches equal :func:`conv_patches`)."""
    iy, ix, inside = tap_coordinates(shape, height, width, oy, ox)
    flat = np.where(inside, iy * width + ix, 0)
    taps = int(np.prod(shape.kernel))
    return flat.reshape(len(oy), taps), inside.reshape(len(oy), taps)


@dataclass(frozen=True)
class PatchMoments:
    """Streamed moments of one layer's refit problem, per group (float64, read-only).

    Attributes:
        count: rows (sample positions) accumulated.
        gram: ``(g, d, d)`` ``Σ x̃ x̃ᵀ``.
        cross: ``(g, d, O_g)`` ``Σ x̃ yᵀ``.
        target_sq: ``(g, O_g)`` ``Σ y²``.
    """

    count: int
    gram: np.ndarray
    cross: np.ndarray
    target_sq: np.ndarray

    def __post_init__(self) -> None:
        for arr in (self.gram, self.cross, self.target_sq):
            arr.setflags(write=False)

    def merge(self, other: PatchMoments) -> PatchMoments:
        """Moments of both sample sets together."""
        return PatchMoments(self.count + other.count, self.gram + other.gram, self.cross + other.cross,
                            self.target_sq + other.target_sq)


def gathered_rows(values: np.ndarray, shape: LayerShape, taps: int) -> np.ndarray:
    """Design rows of gathered input values, built in one pass as :data:`PRODUCTS` (what :func:`accumulate` reads,
    so it makes no copy): ``(N, C, P * taps)`` (per sample, ``P`` positions of ``taps`` values per channel) -> ``(N * P,
    group, C_g * taps [+ 1])``, the :func:`conv_patches` layout with the intercept column of :func:`patch_rows`."""
    n, channels = values.shape[:2]
    per_group, positions = channels // shape.group, values.shape[2] // taps
    per = per_group * taps
    rows = np.empty((n, positions, shape.group, per + int(shape.intercept)), PRODUCTS)
    view = rows[..., :per]
    view.shape = (n, positions, shape.group, per_group, taps)  # a view (raises rather than copy)
    view[...] = values.reshape(n, shape.group, per_group, positions, taps).transpose(0, 3, 1, 2, 4)
    if shape.intercept:
        rows[..., per] = 1.0
    return rows.reshape(-1, shape.group, rows.shape[-1])


def gathered_targets(values: np.ndarray, groups: int) -> np.ndarray:
    """``(N, O, P)`` gathered outputs -> ``(N * P, groups, O / groups)`` :data:`PRODUCTS` targets (one pass)."""
    n, out, positions = values.shape
    targets = np.empty((n, positions, out), PRODUCTS)
    targets[...] = values.transpose(0, 2, 1)
    return targets.reshape(n * positions, groups, out // groups)


def patch_rows(x: np.ndarray, shape: LayerShape) -> np.ndarray:
    """``(R, g, d)`` design rows: patches (or feature rows) with the intercept column appended when modelled."""
    if shape.intercept:
        x = np.concatenate([x, np.ones((*x.shape[:2], 1), x.dtype)], axis=2)
    return x


def _shifted(values: np.ndarray, dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``values`` ``(R, g, k)`` in ``dtype`` minus their mean rounded to ``dtype``, the float64 sums and shift."""
    values = np.asarray(values, dtype)
    total = values.sum(axis=0, dtype=np.float64)
    shift = (total / len(values)).astype(dtype)
    return values - shift, total, shift.astype(np.float64)


def _product(xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
    """``Σ_r x_r y_rᵀ`` per group in the rows' dtype (``yc is xc``: numpy's X^T X fast path)."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught by the caller
        if xc.shape[1] == 1:  # one group: plain 2-D products
            return (xc[:, 0].T @ (xc[:, 0] if yc is xc else yc[:, 0]))[None]
        xg = np.ascontiguousarray(xc.transpose(1, 0, 2))
        return xg.transpose(0, 2, 1) @ (xg if yc is xc else np.ascontiguousarray(yc.transpose(1, 0, 2)))


def _unshifted(part: np.ndarray, n: int, sum_x: np.ndarray, s: np.ndarray, sum_y: np.ndarray,
               t: np.ndarray) -> np.ndarray:
    """``Σ x yᵀ = Σ (x - s)(y - t)ᵀ + S tᵀ + s Tᵀ - n s tᵀ`` for any shifts ``s``, ``t`` (``S = Σ x``, ``T = Σ y``)."""
    return (part.astype(np.float64) + sum_x[:, :, None] * t[:, None, :] + s[:, :, None] * sum_y[:, None, :]
            - n * s[:, :, None] * t[:, None, :])


def products(x: np.ndarray, y: np.ndarray | None = None, dtype: type | None = None) -> np.ndarray:
    """``Σ_r x_r y_rᵀ`` per group, float64 ``(g, d, o)``, of rows ``x`` ``(R, g, d)`` and ``y`` ``(R, g, o)`` (None:
    ``x``, the Gram matrix): products in ``dtype`` (default :data:`PRODUCTS`) of the rows shifted by their mean,
    the shift added back exactly in float64, so that the rounding is relative to the rows' spread, not to their
    offset; in float64 again when the ``dtype`` products are not finite (module docstring, Precision)."""
    dtype = dtype or PRODUCTS
    xc, sum_x, s = _shifted(x, dtype)
    yc, sum_y, t = (xc, sum_x, s) if y is None else _shifted(y, dtype)
    part = _product(xc, yc)
    if dtype != np.float64 and not np.isfinite(part).all():
        return products(x, y, np.float64)
    return _unshifted(part, len(xc), sum_x, s, sum_y, t)


def accumulate(rows: np.ndarray, targets: np.ndarray, dtype: type | None = None) -> PatchMoments:
    """Moments of design rows ``(R, g, d)`` against targets ``(R, g, O_g)`` (:func:`products` in ``dtype``, the
    rows shifted once for both products)."""
    dtype = dtype or PRODUCTS
    xc, sum_x, s = _shifted(rows, dtype)
    yc, sum_y, t = _shifted(targets, dtype)
    gram, cross = _product(xc, xc), _product(xc, yc)
    if dtype != np.float64 and not (np.isfinite(gram).all() and np.isfinite(cross).all()):
        return accumulate(rows, targets, np.float64)
    n = len(xc)
    return PatchMoments(n, _unshifted(gram, n, sum_x, s, sum_x, s), _unshifted(cross, n, sum_x, s, sum_y, t),
                        np.square(targets, dtype=np.float64).sum(axis=0))


class MomentSums:
    """Mutable float64 sums of :class:`PatchMoments`, folded in place batch after batch (no ``d x d`` copy per
    batch); :meth:`freeze` gives the read-only moments."""

    def __init__(self) -> None:
        """No rows yet (arrays are allocated by the first batch)."""
        self.count = 0
        self.gram = self.cross = self.target_sq = np.zeros(0)

    def add(self, rows: np.ndarray, targets: np.ndarray) -> None:
        """Fold design rows ``(R, g, d)`` against targets ``(R, g, O_g)`` (what :func:`accumulate` computes)."""
        part = accumulate(rows, targets)
        if self.count == 0:
            self.gram, self.cross, self.target_sq = part.gram.copy(), part.cross.copy(), part.target_sq.copy()
        else:
            self.gram += part.gram
            self.cross += part.cross
            self.target_sq += part.target_sq
        self.count += part.count

    def freeze(self) -> PatchMoments | None:
        """The moments so far (None before any row)."""
        return None if self.count == 0 else PatchMoments(self.count, self.gram, self.cross, self.target_sq)


def patch_error(moments: PatchMoments, coef: np.ndarray) -> float:
    """``Σ ||y - Wᵀ x̃||²`` over the samples the moments describe (``coef``: ``(g, d, O_g)``)."""
    quad = float(np.sum(coef * np.matmul(moments.gram, coef)))  # tr(Wᵀ G W) per group, through BLAS
    return float(moments.target_sq.sum() - 2.0 * np.sum(coef * moments.cross) + quad)


def solve_refit(moments: PatchMoments, alpha: float, intercept: bool) -> np.ndarray:
    """Ridge least squares per group (intercept unpenalised): ``(g, d, O_g)`` coefficients."""
    groups, dim, _ = moments.gram.shape
    penalised = dim - 1 if intercept else dim
    coef = np.empty(moments.cross.shape)
    for j in range(groups):
        gram = moments.gram[j]
        lam = alpha * max(float(np.trace(gram[:penalised, :penalised])) / max(penalised, 1), 1e-12)
        reg = gram.copy()
        reg[np.arange(penalised), np.arange(penalised)] += lam
        try:
            coef[j] = np.linalg.solve(reg, moments.cross[j])
        except np.linalg.LinAlgError:  # only an unpenalised intercept can make it singular (a constant input)
            coef[j] = np.linalg.lstsq(reg, moments.cross[j], rcond=None)[0]
    return coef


@dataclass(frozen=True)
class RefitChoice:
    """The coefficients chosen for one layer: ``alpha`` None means the layer's current weights were kept."""

    coef: np.ndarray
    alpha: float | None
    error_before: float
    error_after: float
    prior_weight: float = 0.0


PRIOR_WEIGHTS = (0.0, 0.25, 1.0, 4.0)  # weights of the position prior of a pooled layer (0: the plain refit)


def with_prior(fit: PatchMoments, prior: PatchMoments | None, weight: float) -> PatchMoments:
    """``fit`` plus ``weight`` times ``prior`` rescaled to ``fit``'s row count (the prior's rows then weigh as much
    per image as the fit's, whatever its positions per image): the moments of the blended least squares."""
    if prior is None or not prior.count or weight == 0.0:
        return fit
    scale = weight * fit.count / prior.count
    return PatchMoments(fit.count, fit.gram + scale * prior.gram, fit.cross + scale * prior.cross,
                        fit.target_sq + scale * prior.target_sq)


def choose_refit(fit: PatchMoments, held_out: PatchMoments | None, current: np.ndarray, intercept: bool,
                 alphas: tuple[float, ...] = REFIT_ALPHAS, prior: tuple[PatchMoments | None, PatchMoments | None]
                 | None = None) -> RefitChoice:
    """``α`` chosen by held-out error, the current weights competing; the winner refit on all moments.

    ``prior``: (fit, held-out) moments of a second, larger least-squares problem with the same unknowns (a pooled
    layer's per-position rows, see :mod:`pipeline.recovery.refit`); the solve then blends it in with a weight from
    ``PRIOR_WEIGHTS`` chosen with ``α`` on the held-out error of the layer's OWN rows (weight 0 competes, so the
    prior is used only where it lowers that error). Errors are relative to the held-out ``Σ||y||²`` (to the fit
    moments' when nothing is held out).
    """
    check = held_out if held_out is not None and held_out.count else fit
    scale = max(float(check.target_sq.sum()), 1e-30)
    before = patch_error(check, current) / scale
    prior_fit, prior_held = prior if prior is not None else (None, None)
    weights = PRIOR_WEIGHTS if prior_fit is not None and prior_fit.count else (0.0,)
    if check is fit or (len(alphas) == 1 and len(weights) == 1):
        alpha = alphas[len(alphas) // 2]
        merged = fit if check is fit else fit.merge(check)
        coef = solve_refit(merged, alpha, intercept)
        return RefitChoice(coef, alpha, before, patch_error(check, coef) / scale)
    tries = [(a, w) for w in weights for a in alphas]
    errors = [patch_error(check, solve_refit(with_prior(fit, prior_fit, w), a, intercept)) / scale for a, w in tries]
    best = int(np.argmin(errors))
    if errors[best] >= before:
        return RefitChoice(current, None, before, before)
    alpha, weight = tries[best]
    whole_prior = prior_fit if prior_held is None or not prior_held.count else prior_fit.merge(prior_held)
    coef = solve_refit(with_prior(fit.merge(check), whole_prior, weight), alpha, intercept)
    return RefitChoice(coef, alpha, before, errors[best], weight)


def coef_from_weights(shape: LayerShape, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """A layer's ONNX weight (and bias) as ``(g, d, O_g)`` coefficients of its design rows."""
    weight = np.asarray(weight, np.float64)
    if shape.op_type == "Conv":
        out = weight.shape[0]
        mat = weight.reshape(shape.group, out // shape.group, -1).transpose(0, 2, 1)
    elif shape.op_type == "ConvTranspose":  # [C_in, O_g, kh, kw] -> per group (C_g * kh * kw, O_g)
        c_in, out_g = weight.shape[:2]
        out = out_g * shape.group
        mat = weight.reshape(shape.group, c_in // shape.group, out_g, -1).transpose(0, 1, 3, 2)
        mat = mat.reshape(shape.group, -1, out_g)
    else:
        mat = (weight.T if shape.trans_b else weight)[None] * shape.alpha
        out = mat.shape[2]
    if not shape.intercept:
        return mat
    b = np.zeros(out) if bias is None else np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (out,)) * shape.beta
    return np.concatenate([mat, b.reshape(shape.group, 1, -1)], axis=1)


def weights_from_coef(shape: LayerShape, coef: np.ndarray, weight_shape: tuple[int, ...],
                      dtype: np.dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """Inverse of :func:`coef_from_weights`: the ONNX weight (of ``weight_shape``) and bias (None for MatMul)."""
    mat = coef[:, :-1] if shape.intercept else coef
    bias = coef[:, -1].reshape(-1) / shape.beta if shape.intercept else None
    if shape.op_type == "Conv":
        weight = mat.transpose(0, 2, 1).reshape(weight_shape)
    elif shape.op_type == "ConvTranspose":
        c_in, out_g = weight_shape[:2]
        weight = mat.reshape(shape.group, c_in // shape.group, -1, out_g).transpose(0, 1, 3, 2)
        weight = weight.reshape(weight_shape)
    else:
        weight = mat[0] / shape.alpha
        weight = weight.T if shape.trans_b else weight
    if weight.shape != tuple(weight_shape):
        raise PreconditionError(f"refit weight of shape {weight.shape} does not fit the layer's {weight_shape}")
    return weight.astype(dtype), None if bias is None else bias.astype(dtype)

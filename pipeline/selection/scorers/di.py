"""Discriminant Information (DI) scorer: exact fast channel drops and greedy backward elimination (methods.md §1).

Math (float64). For a group's features in one probe: total scatter ``S``, ``D`` with columns ``√n_k (μ_k − μ)``,
``S_B = D Dᵀ``, ridge ``ρ = eps · tr(S)/d`` (``eps`` param, default 1e-3; computed once on the full group and kept
fixed while channels are removed, so drops and retention compare like with like; never below ``d · ε · max_i G_ii``,
the float64 rounding noise of ``S = G − n μ μᵀ`` from the raw moments ``G``, which binds only for features whose mean
is about 10⁴ times their spread or more, e.g. near-constant channels, where ``S`` can come out with negative
eigenvalues larger than ``eps · tr(S)/d``; should ``A`` still fail its Cholesky, ``ρ`` grows by twice the most
negative eigenvalue of ``S``, with a warning), ``A = S + ρI``, ``M = A⁻¹``
(Cholesky certifies positive definiteness; numpy has no ``potri``, so the inverse itself is LAPACK ``getri``),
``Q = M D``, ``G = Q Qᵀ``. The full elimination below pivots on every feature block of ``M``, so it certifies positive
definiteness itself (``M`` is positive definite iff every pivot block of a complete symmetric elimination is): the
scorer inverts ``A`` directly and runs the certifying Cholesky of ``A`` (and the ridge fallback) only when a pivot
fails, which gives the same ``M`` bit for bit while saving a third of the set-up (a ``d³/3`` factorisation per probe,
most of the scoring time on ResNet-50's 2048-wide probes)::

    DI = tr(A⁻¹ S_B) = tr(Dᵀ M D)
    ΔDI_B = DI(all) − DI(all ∖ B) = tr(Q_Bᵀ (M_BB)⁻¹ Q_B) = tr((M_BB)⁻¹ G_BB)      (scalar: G_cc / M_cc)

where ``B`` is the block of features a channel owns (``cells`` pooled cells, times the number of times the group
occurs in the probe). Removing ``B`` downdates (Schur complement) ``M ← M − M_{:B} M_BB⁻¹ M_{B:}`` and
``G ← P G Pᵀ`` with ``P = I − M_{:B} M_BB⁻¹ E_Bᵀ``, i.e. ``G ← G − X Yᵀ − Y Xᵀ`` with ``X = M_{:B} M_BB⁻¹`` and
``Y = G_{:B} − X G_BB / 2``; rows and columns of removed features become exactly zero. Greedy backward
elimination removes, at every step, the channel with the smallest drop. The downdates are applied lazily: the
low-rank factors of up to ``flush`` steps (default about ``2√d``) are kept in buffers (the columns of the current
``M``/``G`` a step needs, and the diagonal blocks of all channels, are updated from them), then folded into ``M``
and ``G`` with one matrix product, after which rows and columns of removed features are dropped (compaction).
A full elimination of ``d`` features costs about ``d³/3`` flops in BLAS-3 for ``M`` (twice that again for ``G``)
plus ``O(d² · flush)``. With few classes (``4K <= d``) ``G`` is not formed: ``Q`` is downdated explicitly every step
(``Q ← Q − X Q_B``, ``O(dK)``) and ``G_BB = Q_B Q_Bᵀ`` is read from it.

Several probes (a residual stream read at several places, a concat): the reduction is ``"mean"`` of normalised
drops, a joint greedy: each step removes the channel minimising ``mean_p ΔDI_p(c) / DI_p(full)``, downdating every
probe; the retention curve is ``r(w) = mean_p DI_p(w) / DI_p(full)``. Scores are rank-derived: the channel
eliminated at step ``t`` (0-based) of a group of ``C`` channels scores ``(t + 1) / C``.

A group in ``G`` equal blocks (read or written by a grouped convolution, ``ChannelGroup.blocks``) is eliminated
round-robin over its blocks (each step among the blocks that lost the fewest channels), so the order and the
retention respect the per-block constraint at every width that is a multiple of ``G``.

Dense targets (detectors, segmenters, CTC recognizers; methods.md §8, :mod:`pipeline.calibration.calibrate_locations`): the
samples of ``S`` and ``D`` are sampled *locations* of the probe, each a C-vector ``f(i, j)`` paired with the class of
that location (its object, segment or time step; background, the blank included, is a class), so ``d = C`` and
``DI = tr((S + ρI)⁻¹ S_B)`` measures how much of the location classes a linear read-out of the channels separates;
the formulas above are unchanged. With the model's own decisions as labels (``--labels model``) it measures which
channels carry what the original model decides. Classes never seen have zero columns in ``D`` and are dropped (a
CTC head over thousands of characters costs what the characters seen cost).

Preconditions: statistics from at least two classes. A probe without class information (``DI = 0``, e.g.
constant features or one class) gives zero drops (order by channel index) and a retention ``w / C``, with a
warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.calibration.stats import ProbeStats
from pipeline.errors import CalibrationError
from pipeline.selection.scorers.base import ChannelScores, ScoringContext, group_views, require_stats

logger = logging.getLogger(__name__)

DEFAULT_EPS = 1e-3
_FLUSH = 0  # 0: choose from the dimension (about 2·√d steps between folds)


def ridge(scatter: np.ndarray, eps: float, gram: np.ndarray | None = None) -> float:
    """``ρ = eps · tr(S)/d`` (``eps`` alone when the features are constant), and with the raw second moments ``G``
    at least the rounding noise of ``S = G − n μ μᵀ`` in float64, ``d · ε · max_i G_ii``."""
    d = scatter.shape[0]
    scale = float(np.trace(scatter)) / d
    rho = eps * (scale if scale > 0 else 1.0)
    if gram is not None and d:
        rho = max(rho, d * float(np.finfo(np.float64).eps) * float(np.max(np.diag(gram))))
    return rho


def inverse_spd(a: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix through its Cholesky factor."""
    try:
        chol = np.linalg.cholesky(a)
    except np.linalg.LinAlgError as err:
        raise CalibrationError("scatter + ridge is not positive definite (NaN statistics?); increase eps") from err
    del chol  # numpy has no potri; the factorisation above only certifies positive definiteness
    return _symmetric_inverse(a)


def _symmetric_inverse(a: np.ndarray) -> np.ndarray:
    """``A⁻¹`` by LAPACK ``getri``, symmetrised (what both the certified and the uncertified paths return)."""
    inv = np.linalg.inv(a)
    return (inv + inv.T) / 2.0


def regularised_inverse(scatter: np.ndarray, eps: float, gram: np.ndarray | None = None) -> np.ndarray:
    """``(S + ρI)⁻¹`` with ``ρ`` from :func:`ridge`; when rounding still leaves ``S + ρI`` indefinite, ``ρ`` grows by
    twice the magnitude of the most negative eigenvalue of ``S`` (a warning says so)."""
    d = scatter.shape[0]
    rho = ridge(scatter, eps, gram)
    try:
        return inverse_spd(scatter + rho * np.eye(d))
    except CalibrationError:
        if not np.isfinite(scatter).all():
            raise
        lowest = float(np.linalg.eigvalsh(scatter)[0])
        raised = rho + 2.0 * max(-lowest, 0.0)
        logger.warning("di: a probe's scatter is indefinite by rounding (smallest eigenvalue %.3g against a ridge of "
                       "%.3g: near-constant features); its ridge is raised to %.3g", lowest, rho, raised)
        return inverse_spd(scatter + raised * np.eye(d))


class _PivotError(Exception):
    """A pivot of an uncertified elimination was not positive: ``S + ρI`` is to be certified (and its ridge raised)."""


def _uncertified_inverse(a: np.ndarray) -> np.ndarray | None:
    """``A⁻¹`` as :func:`inverse_spd` computes it (same bits) but without its Cholesky; None when ``A`` is not finite
    or singular (the certified path then raises or repairs)."""
    if not np.isfinite(a).all():
        return None
    try:
        return _symmetric_inverse(a)
    except np.linalg.LinAlgError:
        return None


def di_value(stats: ProbeStats, eps: float = DEFAULT_EPS) -> float:
    """``DI = tr[(S + ρI)⁻¹ S_B]`` of all features of ``stats``."""
    s = stats.scatter()
    d = stats.delta()
    a = s + ridge(s, eps, stats.gram) * np.eye(s.shape[0])
    return float(np.sum(d * np.linalg.solve(a, d)))


class Eliminator:
    """Greedy DI elimination state of one probe view (see the module docstring for the algebra).

    Classes without calibration samples have zero columns in ``D`` and are dropped (a 1000-class head calibrated on
    a few classes costs what those classes cost). With few classes (``4K <= d``) ``Q = M D`` is kept explicitly and updated every step (``O(dK)``), and
    ``G_BB = Q_B Q_Bᵀ`` is read from it; otherwise ``G`` is kept lazily like ``M``.
    """

    def __init__(self, stats: ProbeStats, blocks: np.ndarray, eps: float = DEFAULT_EPS, flush: int = _FLUSH, *,
                 certified: bool = False) -> None:
        """Invert ``S + ρI`` and set up the lazy downdate buffers; ``blocks`` is (channels, b) feature indices.
        Unless ``certified`` (or the blocks do not cover every feature once), the inverse is not certified up front:
        :meth:`remove` raises :class:`_PivotError` on a pivot that is not positive definite and :func:`eliminate`
        starts again from :meth:`certify`'s eliminator (Cholesky of ``S + ρI``, the ridge raised if needed)."""
        s = stats.scatter()
        delta = stats.delta()[:, stats.row_counts > 0]  # empty classes: zero columns, no information
        self._args = (stats, blocks, eps, flush)
        covers = np.array_equal(np.sort(np.asarray(blocks).reshape(-1)), np.arange(s.shape[0]))
        m = None if certified or not covers else _uncertified_inverse(s + ridge(s, eps, stats.gram) * np.eye(len(s)))
        self.checking = m is not None  # pivots still to be checked (by the elimination)
        self.m = m if m is not None else regularised_inverse(s, eps, stats.gram)
        self.q = self.m @ delta
        self.q_mode = 4 * delta.shape[1] <= s.shape[0]
        self.g = None if self.q_mode else self.q @ self.q.T
        self.blocks = np.asarray(blocks, dtype=np.int64)
        self.di_full = float(np.sum(delta * self.q))
        self.di_now = self.di_full
        self.alive = np.ones(len(self.blocks), dtype=bool)
        self._mb = self.m[self.blocks[:, :, None], self.blocks[:, None, :]]  # (C, b, b) diagonal blocks
        self._gb = None if self.g is None else self.g[self.blocks[:, :, None], self.blocks[:, None, :]]
        steps = flush if flush > 0 else max(16, int(2 * np.sqrt(s.shape[0])))
        self._width = steps * self.blocks.shape[1]
        self._pos = np.arange(s.shape[0])  # feature -> row of the (compacted) M, G and Q
        self._buffers(s.shape[0])

    def _buffers(self, rows: int) -> None:
        self._u = np.zeros((rows, self._width), order="F")  # M = M_stored − U Uᵀ
        if not self.q_mode:
            self._x = np.zeros((rows, self._width), order="F")  # G = G_stored − X Yᵀ − Y Xᵀ
            self._y = np.zeros((rows, self._width), order="F")
        self._used = 0

    def certify(self) -> Eliminator:
        """A fresh eliminator of the same statistics whose inverse is certified by a Cholesky factorisation."""
        stats, blocks, eps, flush = self._args
        return Eliminator(stats, blocks, eps, flush, certified=True)

    def _g_blocks(self, live: np.ndarray) -> np.ndarray:
        if self._gb is not None:
            return self._gb[live]
        qb = self.q[self._pos[self.blocks[live]]]  # (live, b, K)
        return qb @ qb.transpose(0, 2, 1)

    def drops(self) -> np.ndarray:
        """``ΔDI`` of removing each live channel now (``inf`` for removed channels)."""
        out = np.full(len(self.blocks), np.inf)
        live = self.alive
        gb = self._g_blocks(live)
        if self.blocks.shape[1] == 1:
            out[live] = gb[:, 0, 0] / self._mb[live, 0, 0]
        else:
            out[live] = np.trace(np.linalg.solve(self._mb[live], gb), axis1=1, axis2=2)
        return np.maximum(out, 0.0)

    def _columns(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        k = self._used
        u = self._u[:, :k]
        m_cols = self.m[:, block] - u @ u[block].T
        if self.q_mode:
            return m_cols, None
        x, y = self._x[:, :k], self._y[:, :k]
        return m_cols, self.g[:, block] - x @ y[block].T - y @ x[block].T

    def _factors(self, m_cols: np.ndarray, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``U`` with ``U Uᵀ = M_{:B} M_BB⁻¹ M_{B:}`` and ``X = M_{:B} M_BB⁻¹``."""
        m_bb = m_cols[block]
        if block.size == 1:  # scalar channel: no factorisation needed
            pivot = float(m_bb[0, 0])
            if self.checking and not pivot > 0:
                raise _PivotError
            return m_cols / np.sqrt(pivot), m_cols / pivot
        try:
            chol = np.linalg.cholesky(m_bb)
        except np.linalg.LinAlgError:
            if self.checking:
                raise _PivotError from None
            raise
        return np.linalg.solve(chol, m_cols.T).T, np.linalg.solve(m_bb, m_cols.T).T

    def remove(self, channel: int) -> float:
        """Remove one channel (its whole feature block); return its exact DI drop."""
        block = self._pos[self.blocks[channel]]
        m_cols, g_cols = self._columns(block)
        u, x = self._factors(m_cols, block)
        rows = self._pos[self.blocks]  # removed channels read arbitrary rows; their blocks are never used again
        ub = u[rows]  # (C, b, r)
        self._mb -= ub @ ub.transpose(0, 2, 1)
        if self.q_mode:
            q_b = self.q[block].copy()
            drop = float(np.trace(np.linalg.solve(m_cols[block], q_b @ q_b.T)))
            self.q -= x @ q_b
        else:
            g_bb = g_cols[block]
            y = g_cols - x @ g_bb / 2.0
            drop = float(np.trace(np.linalg.solve(m_cols[block], g_bb)))
            xb, yb = x[rows], y[rows]
            self._gb -= xb @ yb.transpose(0, 2, 1) + yb @ xb.transpose(0, 2, 1)
            sl = slice(self._used, self._used + block.size)
            self._x[:, sl], self._y[:, sl] = x, y
        self._u[:, self._used:self._used + block.size] = u
        self._used += block.size
        self.alive[channel] = False
        self.di_now = max(self.di_now - drop, 0.0)
        if self._used + block.size > self._width:
            self._fold()
        return drop

    def _fold(self) -> None:
        k = self._used
        u = self._u[:, :k]
        self.m -= u @ u.T
        if not self.q_mode:
            x, y = self._x[:, :k], self._y[:, :k]
            self.g -= np.concatenate((x, y), axis=1) @ np.concatenate((y, x), axis=1).T
        live = self.blocks[self.alive].reshape(-1)  # compact: drop rows/columns of removed features
        rows = self._pos[live]
        self.m, self.q = self.m[np.ix_(rows, rows)], self.q[rows]
        if self.g is not None:
            self.g = self.g[np.ix_(rows, rows)]
        self._pos = np.full(self._pos.shape, -1)
        self._pos[live] = np.arange(live.size)
        self._buffers(live.size)


@dataclass(frozen=True)
class Elimination:
    """Result of a (joint) greedy elimination of one group."""

    order: np.ndarray  # channels, first removed first
    retention: np.ndarray  # r(w) for w = 0..C
    drops: np.ndarray  # normalised first-step drops of every channel (mean over probes)


def eliminate(eliminators: list[Eliminator], blocks: int = 1) -> Elimination:
    """Joint greedy backward elimination over probes (reduction "mean" of normalised drops).

    ``blocks > 1`` (a group read or written by a grouped convolution): each step removes from one of the
    ``blocks`` equal blocks that have lost the fewest channels so far, so that every prefix of ``blocks * r``
    steps removes exactly ``r`` channels of each block and the retention at those widths is of a valid plan.
    An eliminator whose inverse was not certified and meets a pivot that is not positive definite restarts the
    elimination with certified eliminators (the result is then what they give from the start).
    """
    try:
        return _eliminate(eliminators, blocks)
    except _PivotError:
        return _eliminate([e.certify() for e in eliminators], blocks)


def _eliminate(eliminators: list[Eliminator], blocks: int) -> Elimination:
    size = len(eliminators[0].blocks)
    per = size // blocks
    removed = np.zeros(blocks, dtype=np.int64)
    scale = [e.di_full if e.di_full > 0 else 1.0 for e in eliminators]
    if any(e.di_full <= 0 for e in eliminators):
        logger.warning("di: a probe carries no class information (DI = 0); its channels are ordered by index")
    first = np.mean([e.drops() / s for e, s in zip(eliminators, scale, strict=True)], axis=0)
    order = np.empty(size, dtype=np.int64)
    retention = np.empty(size + 1)
    retention[size] = 1.0
    for step in range(size):
        total = np.mean([e.drops() / s for e, s in zip(eliminators, scale, strict=True)], axis=0)
        if blocks > 1:
            total = np.where(removed[np.arange(size) // per] == removed.min(), total, np.inf)
        channel = int(np.argmin(total))  # ties: lowest channel index
        removed[channel // per] += 1
        for item in eliminators:
            item.remove(channel)
        order[step] = channel
        width = size - step - 1  # a probe without class information (DI = 0) retains in proportion to width
        retention[width] = np.mean([e.di_now / e.di_full if e.di_full > 0 else width / size for e in eliminators])
    retention[0] = 0.0
    retention = np.maximum.accumulate(np.clip(retention, 0.0, 1.0))  # exact DI is monotone; remove rounding noise
    return Elimination(order=order, retention=retention, drops=first)


@dataclass(frozen=True)
class DIScorer:
    """DI drops + greedy elimination (methods.md §1.4-1.6)."""

    name: str = "di"
    requires_stats: bool = True
    requires_labels: bool = True

    def __call__(self, ctx: ScoringContext) -> ChannelScores:
        """Score every prunable group; see the module docstring."""
        stats = require_stats(ctx, self.name)
        eps = ctx.param("eps", DEFAULT_EPS)
        scores, orders, retentions = {}, {}, {}
        for group in ctx.prunable():
            views = group_views(group, ctx.index, stats)
            result = eliminate([Eliminator(v.stats, v.blocks, eps) for v in views], group.blocks)
            rank = np.empty(group.size)
            rank[result.order] = (np.arange(group.size) + 1.0) / group.size
            scores[group.id], orders[group.id], retentions[group.id] = rank, result.order, result.retention
            logger.debug("di: group %s (%d channels, %d probes) scored", group.id, group.size, len(views))
        return ChannelScores(method=self.name, params={"eps": eps}, scores=scores, order=orders,
                             retention=retentions, model_sha256=ctx.model_sha256)

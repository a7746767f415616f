"""PLS-VIP scorer (methods.md §3, Jordao et al.), computed from sufficient statistics.

Reference behaviour: one PLS2 regression (NIPALS, ``n_components`` = 2, X and Y standardised) of one-hot labels on
pooled features, then the VIP of every feature::

    VIP_j = sqrt( F · Σ_a SS_a (w_ja / ‖w_a‖)² / Σ_a SS_a ),   SS_a = (t_aᵀ t_a)(q_aᵀ q_a)

How we get it without per-sample data: with standardised ``X`` and ``Y`` PLS only needs ``XᵀX``, ``XᵀY`` (and
``YᵀY``), all exact functions of the statistics: ``XᵀX = S / (σ σᵀ)`` (correlation-scaled scatter),
``(XᵀY)_{:,k} = (s_k − n_k μ) / (σ σ_{y,k})``, ``σ_{y,k}² = n_k (1 − n_k/n) / (n − 1)``, ``σ² = diag(S)/(n − 1)``
(zero-variance features get ``σ = 1``, as scikit-learn does). The kernel algorithm (Dayal & MacGregor 1997,
"Improved PLS algorithms", algorithm 1) then gives the NIPALS weights: ``w_a`` = leading left singular vector of
the deflated ``XᵀY``; ``r_a = w_a − Σ_{b<a} (p_bᵀ w_a) r_b``; ``t_aᵀt_a = r_aᵀ XᵀX r_a``; ``p_a = XᵀX r_a / t_aᵀt_a``;
``q_a = (XᵀY)ᵀ r_a / t_aᵀt_a``; deflate ``XᵀY ← XᵀY − t_aᵀt_a p_a q_aᵀ``.

Approximation (stated): the reference pools the features of ALL layers into one X. Statistics hold only per-probe
grams (no cross-probe covariance), so we fit one PLS per probe tensor, on all of that tensor's features (every group
in it, as the reference does within a layer). A channel scores the mean VIP of its cells; a group read at several
probes averages its per-probe scores (VIP is already scale-free: mean VIP² = 1 in every probe). Dense targets: the
rows of ``X`` and ``Y`` are sampled locations and their one-hot classes (methods.md §8,
:mod:`pipeline.calibration.calibrate_locations`); classes never seen (``ProbeStats.class_ids``) have zero columns in ``XᵀY`` and
are left out, which changes no VIP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.calibration.stats import ProbeStats
from pipeline.selection.scorers.base import ChannelScores, ScoringContext, group_views, require_stats

DEFAULT_COMPONENTS = 2


def standardised_moments(stats: ProbeStats) -> tuple[np.ndarray, np.ndarray]:
    """``XᵀX`` and ``XᵀY`` of standardised features and standardised one-hot labels."""
    n = stats.n
    scatter = stats.scatter()
    sigma = np.sqrt(np.maximum(np.diag(scatter), 0.0) / max(n - 1, 1))
    sigma = np.where(sigma > 0, sigma, 1.0)
    counts = stats.row_counts.astype(np.float64)  # the classes class_sums holds (all, or those seen)
    sigma_y = np.sqrt(counts * (1.0 - counts / n) / max(n - 1, 1))
    sigma_y = np.where(sigma_y > 0, sigma_y, 1.0)
    xty = (stats.class_sums - counts[:, None] * stats.mean()[None, :]).T
    return scatter / np.outer(sigma, sigma), xty / np.outer(sigma, sigma_y)


def vip(xtx: np.ndarray, xty: np.ndarray, components: int = DEFAULT_COMPONENTS) -> np.ndarray:
    """VIP of every feature from kernel PLS2 on ``XᵀX`` (F, F) and ``XᵀY`` (F, K)."""
    f = xtx.shape[0]
    xty = xty.copy()
    ws, rs, ps, ss = [], [], [], []
    for _ in range(min(components, f)):
        left, _, _ = np.linalg.svd(xty, full_matrices=False)
        w = left[:, 0]
        r = w.copy()
        for p_b, r_b in zip(ps, rs, strict=True):
            r -= float(p_b @ w) * r_b
        xtx_r = xtx @ r
        tt = float(r @ xtx_r)
        if tt <= 0:
            break
        p, q = xtx_r / tt, xty.T @ r / tt
        xty -= tt * np.outer(p, q)
        ws.append(w)
        rs.append(r)
        ps.append(p)
        ss.append(tt * float(q @ q))
    if not ss or sum(ss) <= 0:
        return np.ones(f)
    weights = np.stack(ws, axis=1) / np.linalg.norm(np.stack(ws, axis=1), axis=0)
    ss_arr = np.asarray(ss)
    return np.sqrt(f * (weights**2 @ ss_arr) / ss_arr.sum())


@dataclass(frozen=True)
class PLSVIPScorer:
    """PLS2 VIP scorer, one PLS per probe tensor."""

    name: str = "pls-vip"
    requires_stats: bool = True
    requires_labels: bool = True

    def __call__(self, ctx: ScoringContext) -> ChannelScores:
        """Score every prunable group; see the module docstring."""
        stats = require_stats(ctx, self.name)
        components = int(ctx.param("n_components", DEFAULT_COMPONENTS))
        per_tensor: dict[str, np.ndarray] = {}
        scores = {}
        for group in ctx.prunable():
            per_probe = []
            for probe, view in zip(group.probes, group_views(group, ctx.index, stats), strict=True):
                if probe not in per_tensor:
                    per_tensor[probe] = vip(*standardised_moments(stats.probes[probe]), components)
                local = per_tensor[probe][view.features]
                per_probe.append(local[view.blocks].mean(axis=1))
            scores[group.id] = np.mean(per_probe, axis=0)
        return ChannelScores(method=self.name, params={"n_components": float(components)}, scores=scores,
                             model_sha256=ctx.model_sha256)


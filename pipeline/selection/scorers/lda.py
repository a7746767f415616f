"""LDA scorer: per-feature Fisher ratios (methods.md §2.2, Eq. 8 of Tian, Arbel & Clark).

Math: with total scatter ``S`` and between scatter ``S_B`` of a group's features (``stats.ProbeStats``), the
within scatter is ``S_W = S − S_B``; per feature ``j``::

    v_j = σ_b²(j) / (σ_w²(j) + λ),    σ_b²(j) = (S_B)_jj,  σ_w²(j) = (S_W)_jj,  λ = eps · mean_j σ_w²(j)

(``eps`` param, default 1e-3; the common factor ``1/n`` cancels). A channel scores the mean ``v`` of its features
(its pooled cells, and every copy of the group in the probe). This is the paper's *diagonal* assumption applied to
the probed layer directly. NOT built: the paper's pre-decision-layer LDA followed by deconvolution tracing of the
utility back through the network (§2.3); every layer is scored on its own activations instead.

Several probes: reduction ``"mean"`` of per-probe scores normalised to unit sum. Dense targets: the samples are
sampled locations of the probe paired with their classes (methods.md §8, :mod:`pipeline.calibration.calibrate_locations`), so
``σ_b²(j)`` and ``σ_w²(j)`` are between- and within-class variances of channel ``j`` over locations; nothing else
changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.calibration.stats import ProbeStats
from pipeline.selection.scorers.base import (
    ChannelScores,
    ScoringContext,
    group_views,
    normalised_mean,
    require_stats,
)

DEFAULT_EPS = 1e-3


def fisher_ratios(stats: ProbeStats, eps: float = DEFAULT_EPS) -> np.ndarray:
    """Per-feature ``σ_b² / (σ_w² + λ)``."""
    between = np.diag(stats.between())
    within = np.maximum(np.diag(stats.scatter()) - between, 0.0)
    scale = float(np.mean(within))
    lam = eps * (scale if scale > 0 else 1.0)
    return between / (within + lam)


@dataclass(frozen=True)
class LDAScorer:
    """Diagonal Fisher-ratio scorer."""

    name: str = "lda"
    requires_stats: bool = True
    requires_labels: bool = True

    def __call__(self, ctx: ScoringContext) -> ChannelScores:
        """Score every prunable group; see the module docstring."""
        stats = require_stats(ctx, self.name)
        eps = ctx.param("eps", DEFAULT_EPS)
        scores = {}
        for group in ctx.prunable():
            per_probe = []
            for view in group_views(group, ctx.index, stats):
                ratios = fisher_ratios(view.stats, eps)
                per_probe.append(ratios[view.blocks].mean(axis=1))
            scores[group.id] = normalised_mean(per_probe)
        return ChannelScores(method=self.name, params={"eps": eps}, scores=scores, model_sha256=ctx.model_sha256)

"""Channel scoring methods; ``SCORERS`` is the one registry (a plain dict, no registration by import)."""

from __future__ import annotations

from pipeline.selection.scorers.base import ChannelScores, Scorer, ScoringContext
from pipeline.selection.scorers.baselines import ActivationScorer, NormScorer, RandomScorer
from pipeline.selection.scorers.di import DIScorer
from pipeline.selection.scorers.lda import LDAScorer
from pipeline.selection.scorers.lda_trace import LDATraceScorer
from pipeline.selection.scorers.pls import PLSVIPScorer

__all__ = ["SCORERS", "ChannelScores", "Scorer", "ScoringContext"]

SCORERS: dict[str, Scorer] = {
    "di": DIScorer(),
    "lda": LDAScorer(),
    "lda-trace": LDATraceScorer(),
    "pls-vip": PLSVIPScorer(),
    "l1": NormScorer(name="l1", power=1),
    "l2": NormScorer(name="l2", power=2),
    "mean-act": ActivationScorer(name="mean-act"),
    "apoz": ActivationScorer(name="apoz"),
    "random": RandomScorer(),
}

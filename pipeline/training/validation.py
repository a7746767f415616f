"""The fine-tune's validation rule: which epoch a fine-tune returns.

The model is checked on a held-out slice of the training data after every epoch (epoch 0: the input). With the
per-sample training objective ``o_e(i)`` of epoch ``e`` on validation sample ``i``, the change from the input is
``d_e(i) = o_e(i) - o_0(i)``, its mean ``m_e`` and standard error ``se_e = std(d_e) / sqrt(n)``. The fine-tune returns
the trained epoch with the lowest objective, unless that epoch is worse than the input beyond the noise
(``m_e > z * se_e``, ``z`` = :data:`NOISE_Z`), in which case it returns the input (:func:`chosen_epoch`): a small
validation slice cannot see small gains, so "strictly better than the input" kept the input in most runs
(``benchmarks/results/finetune_loops.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NOISE_Z = 2.0  # an epoch is rejected when its objective rose by more than this many standard errors


@dataclass(frozen=True)
class EpochCheck:
    """The model on the validation slice after ``epoch`` epochs (0: the input): top-1 on the labels (None
    without labels), the distillation term at weight 1, the training objective, and the mean per-sample change of
    the objective from the input's with its standard error (:func:`paired_change`; 0 for the input)."""

    epoch: int
    top1: float | None
    distill_loss: float
    objective: float
    change: float = 0.0
    noise: float = 0.0

    def worse_than_input(self, z: float = NOISE_Z) -> bool:
        """The objective rose from the input's by more than ``z`` standard errors of the paired per-sample
        change (``change`` > ``z`` x ``noise``; module docstring)."""
        return self.change > z * self.noise


def paired_change(after: np.ndarray, before: np.ndarray) -> tuple[float, float]:
    """The mean per-sample change of the objective from ``before`` to ``after`` (the same samples) and its
    standard error (0 for a single sample)."""
    diff = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    noise = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else 0.0
    return float(diff.mean()), noise


def chosen_epoch(checks: Sequence[EpochCheck], z: float = NOISE_Z) -> int:
    """The epoch to return (module docstring): the trained epoch with the lowest validation objective (the first
    of equals), or 0 (the input) when that epoch is worse than the input by more than ``z`` standard errors."""
    best = best_trained(checks)
    return 0 if best is None or best.worse_than_input(z) else best.epoch


def best_trained(checks: Sequence[EpochCheck]) -> EpochCheck | None:
    """The trained epoch (epoch > 0) with the lowest validation objective, the first of equals; None before any."""
    trained = [c for c in checks if c.epoch > 0]
    return min(trained, key=lambda c: c.objective) if trained else None


def validation_split(samples: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(training, validation)`` sample indices: a seeded ``share`` of the samples (at least one when the share
    is positive and there are two samples or more) held out, both sorted."""
    count = 0 if share <= 0 or samples < 2 else min(samples - 1, max(1, round(share * samples)))
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7]).permutation(samples)
    return np.sort(order[count:]), np.sort(order[:count])

"""More regression rows for R3 without more data: perturbed copies of the calibration samples.

R3 (:mod:`pipeline.recovery.refit`) fits each layer's pruned input ``x̃`` to the ORIGINAL model's output ``y`` on the
same image: ``min_W Σ ||W x̃ - y||²``. Nothing in that problem needs a label or a natural image: every input the
model accepts is a valid row, its target the original model's own activation. Where the data has few rows per
unknown (small maps deep in a network, one row per image behind a global pool: SE gates, classifiers), perturbed
copies of the calibration samples add rows near the data's distribution at the cost of a longer sweep (time is
linear in the samples). The copies:

* ``shift``: the image moved by up to 1/8 of each spatial size, not by zero (edges replicated), 4-D
  ``(N, C, H, W)`` inputs;
* ``flip``: mirrored along one spatial axis (W or H, at random), 4-D inputs;
* ``mix``: ``λ x_i + (1 - λ) x_j`` with another calibration sample ``j ≠ i`` and ``λ ~ U(0.3, 0.7)`` (any float
  input);
* ``noise``: ``x + ε``, ``ε ~ N(0, (0.1 σ_c)²)`` with ``σ_c`` the sample's own per-channel standard deviation.

Sample ``i`` of copy ``k`` (``k = 1..copies``) uses kind ``kinds[(k - 1) % len(kinds)]`` and a generator seeded by
``(seed, k, i)``: the augmented set is deterministic and any slice of it reads the same values (sharding, workers).
The originals come first (copy 0), then the copies, each in a batch of the same hold-out role as its original's
(:func:`augmented`); labels are dropped (the mixed copies have none; recovery needs none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from pipeline.errors import UserInputError
from pipeline.recovery.sweep import held_out

__all__ = ["AUGMENTATIONS", "augmented"]

SHIFT_FRACTION = 8  # shift: at most 1/8 of each spatial size
MIX_RANGE = (0.3, 0.7)
NOISE_FRACTION = 0.1


def _shift(x: np.ndarray, rng: np.random.Generator, pick: Callable[[], np.ndarray]) -> np.ndarray:
    _need_image(x, "shift")
    h, w = x.shape[-2:]
    dy = dx = 0
    while dy == dx == 0 and max(h, w) >= SHIFT_FRACTION:  # a copy that moves (maps smaller than 8 stay)
        dy, dx = (int(rng.integers(-(s // SHIFT_FRACTION), s // SHIFT_FRACTION + 1)) for s in (h, w))
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(abs(dy),) * 2, (abs(dx),) * 2], mode="edge")
    return padded[..., abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w]


def _flip(x: np.ndarray, rng: np.random.Generator, pick: Callable[[], np.ndarray]) -> np.ndarray:
    _need_image(x, "flip")
    return np.flip(x, axis=-1 if rng.random() < 0.5 else -2)


def _mix(x: np.ndarray, rng: np.random.Generator, pick: Callable[[], np.ndarray]) -> np.ndarray:
    lam = float(rng.uniform(*MIX_RANGE))
    return lam * x + (1.0 - lam) * pick()


def _noise(x: np.ndarray, rng: np.random.Generator, pick: Callable[[], np.ndarray]) -> np.ndarray:
    axes = tuple(range(1, x.ndim)) if x.ndim > 1 else None
    sigma = x.std(axis=axes, keepdims=True) if axes else x.std()
    return x + NOISE_FRACTION * sigma * rng.standard_normal(x.shape)


def _need_image(x: np.ndarray, kind: str) -> None:
    if x.ndim != 3:  # one sample of an (N, C, H, W) input
        raise UserInputError(f"recovery augmentation '{kind}' needs image inputs (N, C, H, W), got a sample of shape "
                             f"{x.shape}; use 'mix' or 'noise'")


AUGMENTATIONS: dict[str, Callable[[np.ndarray, np.random.Generator, Callable[[], np.ndarray]], np.ndarray]] = {
    "shift": _shift, "flip": _flip, "mix": _mix, "noise": _noise,
}
DEFAULT_KINDS = ("shift", "flip")  # mix and noise: measured no help (mix shrinks the inputs; docs/guide)


def augmented(dataset: Any, copies: int, kinds: Sequence[str] = DEFAULT_KINDS, seed: int = 0,
              batch_size: int = 1) -> Any:
    """``dataset`` followed by ``copies`` perturbed copies of every sample (module docstring); 0 copies: unchanged.

    R3 holds out every :data:`~pipeline.recovery.sweep.HOLD_OUT_EVERY`-th batch of ``batch_size`` samples to choose its ridge and to let the
    current weights compete: a copy of a held-out sample must not be fitted on (and a copy of a fitted one must not
    judge the fit), so the copies are placed after the originals at positions whose batch has the same role as their
    original's batch; the few copies left over when one role's positions run out are dropped.

    Raises:
        UserInputError: negative ``copies``, an unknown kind, or a kind the input does not support.
    """
    if copies < 0:
        raise UserInputError(f"recovery augmentation copies must be >= 0, got {copies}")
    unknown = [k for k in kinds if k not in AUGMENTATIONS]
    if unknown or not kinds:
        raise UserInputError(f"unknown recovery augmentation {unknown or '(none)'}; choose from "
                             f"{', '.join(AUGMENTATIONS)}")
    if copies == 0:
        return dataset
    n, base, kinds = dataset.num_samples, dataset.loader, tuple(kinds)
    sources, copy_of = _layout(n, copies, batch_size)

    def loader(idx: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64)
        feeds = base(sources[idx])
        out = {key: np.array(arr, copy=True) for key, arr in feeds.items()}
        for row, j in enumerate(idx):
            copy, source = int(copy_of[j]), int(sources[j])
            if copy == 0:
                continue
            rng = np.random.default_rng((seed, copy, source))
            kind = AUGMENTATIONS[kinds[(copy - 1) % len(kinds)]]
            partner = (source + 1 + int(rng.integers(n - 1))) % n if n > 1 else source  # another sample
            for key, arr in out.items():
                if not np.issubdtype(arr.dtype, np.floating):
                    continue  # ids, masks: kept as they are
                other = partial(_sample, base, partner, key)
                arr[row] = kind(arr[row], rng, other).astype(arr.dtype)
        return out

    return replace(dataset, name=f"{dataset.name}+{copies}x{'/'.join(kinds)}", num_samples=len(sources),
                   labels=None, loader=loader, spec=None, targets=None)


def _sample(loader: Callable[[np.ndarray], dict[str, np.ndarray]], index: int, key: str) -> np.ndarray:
    return loader(np.array([index]))[key][0]


def _layout(n: int, copies: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position of the augmented set: the source sample and the copy number (0: the original); a copy sits in a
    batch whose hold-out role is its original's (:func:`augmented`)."""
    def held(position: int) -> bool:
        return held_out(position // batch_size)

    queues: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
    for copy in range(1, copies + 1):
        for source in range(n):
            queues[held(source)].append((source, copy))
    order = [(source, 0) for source in range(n)]
    taken = {True: 0, False: 0}
    while True:
        role = held(len(order))
        if taken[role] == len(queues[role]):
            break
        order.append(queues[role][taken[role]])
        taken[role] += 1
    pairs = np.array(order, dtype=np.int64)
    return pairs[:, 0], pairs[:, 1]

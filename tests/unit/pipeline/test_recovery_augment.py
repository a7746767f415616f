"""Perturbed copies of the calibration samples as extra R3 rows (pipeline/recovery/augment.py)."""

from __future__ import annotations

import numpy as np
import pytest

from graph_ops.canonicalize import canonicalize
from graph_ops.channels import analyze
from graph_ops.prune import apply_plan
from pipeline.data.datasets import from_iterable
from pipeline.errors import UserInputError
from pipeline.recovery import recover
from pipeline.recovery.augment import AUGMENTATIONS, _layout, augmented
from pipeline.recovery.sweep import HOLD_OUT_EVERY
from tests.graphs import depthwise_separable
from tests.oracles import assert_same_outputs, random_valid_plan, recovered_reference, run_ort

N = 6


def _images(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 10)).astype(np.float32)


def _all(dataset) -> np.ndarray:
    return next(iter(dataset.loader(np.arange(dataset.num_samples)).values()))


def test_no_copies_is_the_dataset_itself() -> None:
    data = from_iterable([(_images(), np.arange(N))])
    assert augmented(data, 0) is data


@pytest.mark.parametrize("kind", list(AUGMENTATIONS))
def test_copies_follow_the_originals_and_any_slice_reads_the_same_values(kind: str) -> None:
    x = _images()
    data = augmented(from_iterable([(x, np.arange(N))]), 3, [kind], seed=5)
    assert data.num_samples == 4 * N and data.labels is None
    full = _all(data)
    assert full.shape == (4 * N, 3, 8, 10) and full.dtype == np.float32
    np.testing.assert_array_equal(full[:N], x)
    sources, copies = _layout(N, 3, 1)
    assert sorted(zip(sources.tolist(), copies.tolist(), strict=True)) == [(s, c) for s in range(N) for c in range(4)]
    for position in range(N, 4 * N):  # every copy is perturbed
        assert not np.allclose(full[position], x[sources[position]])
    part = next(iter(data.loader(np.array([13, 2, 20])).values()))
    np.testing.assert_array_equal(part, full[[13, 2, 20]])
    again = _all(augmented(from_iterable([(x, None)]), 3, [kind], seed=5))
    np.testing.assert_array_equal(again, full)


def test_each_kind_is_what_its_docstring_says() -> None:
    x = _images()
    # one batch for everything: nothing held out, the copies in the order of their sources
    out = {kind: _all(augmented(from_iterable([(x, None)]), 1, [kind], batch_size=100))[N:] for kind in AUGMENTATIONS}
    for i in range(N):
        flipped = [np.flip(x[i], axis=a) for a in (-1, -2)]
        assert any(np.array_equal(out["flip"][i], f) for f in flipped)
        # mix: out - x_i is a multiple in [0.3, 0.7] of (x_j - x_i) for some other calibration sample j
        d = out["mix"][i].astype(np.float64) - x[i]
        ratios = [float(np.dot(d.ravel(), (x[j] - x[i]).ravel()) / np.sum((x[j] - x[i]) ** 2))
                  for j in range(N) if j != i]
        fits = [j for j, r in zip([j for j in range(N) if j != i], ratios, strict=True)
                if np.allclose(d, r * (x[j] - x[i]), atol=1e-5) and 0.3 <= 1 - r <= 0.7]
        assert fits
        # shift: the interior of the copy equals the image moved by some (dy, dx) within 1/8 of each size
        moved = [(dy, dx) for dy in range(-1, 2) for dx in range(-1, 2)
                 if np.array_equal(out["shift"][i][:, 1:-1, 1:-1], x[i][:, 1 - dy:7 - dy, 1 - dx:9 - dx])]
        assert moved
        noise = out["noise"][i] - x[i]
        assert 0.02 < noise.std() / x[i].std() < 0.3


@pytest.mark.parametrize(("n", "copies", "batch"), [(6, 3, 1), (23, 4, 2), (50, 2, 8), (7, 5, 64)])
def test_a_copy_sits_in_a_batch_of_its_originals_hold_out_role(n: int, copies: int, batch: int) -> None:
    sources, copy = _layout(n, copies, batch)
    held = (np.arange(len(sources)) // batch) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
    held_source = (sources // batch) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
    np.testing.assert_array_equal(held, held_source)
    np.testing.assert_array_equal(sources[:n], np.arange(n))
    assert len(set(zip(sources.tolist(), copy.tolist(), strict=True))) == len(sources)  # no copy twice
    assert len(sources) >= n * (copies + 1) - 2 * batch * HOLD_OUT_EVERY  # only a few copies dropped


@pytest.mark.parametrize(("copies", "kinds", "x", "match"), [
    (-1, ["mix"], _images(), "copies"),
    (1, ["rotate"], _images(), "unknown recovery augmentation"),
    (1, [], _images(), "unknown recovery augmentation"),
    (1, ["shift"], np.zeros((10, 5), np.float32), "needs image inputs"),
])
def test_bad_requests_are_user_errors(copies: int, kinds: list, x: np.ndarray, match: str) -> None:
    with pytest.raises(UserInputError, match=match):
        _all(augmented(from_iterable([(x, None)]), copies, kinds))


def test_integer_inputs_are_not_perturbed() -> None:
    ids = np.arange(N * 4).reshape(N, 4)
    data = augmented(from_iterable([({"ids": ids, "x": _images()[:, 0, 0, :4].copy()}, None)]), 2, ["noise"])
    feeds = data.loader(np.arange(data.num_samples))
    sources, _ = _layout(N, 2, 1)
    np.testing.assert_array_equal(feeds["ids"], ids[sources])
    x = _images()[:, 0, 0, :4]
    assert not np.allclose(feeds["x"][N:], x[sources[N:]])
    assert not np.allclose(feeds["x"][N:], feeds["x"][sources[N:]])


def test_augmented_lstsq_equals_its_mask_reference_and_helps_a_layer_on_few_images() -> None:
    """With copies the refit is still exact surgery (the mask oracle) and, on 10 images, the output of the refit model
    on held-out samples moves closer to the original's than without them."""
    model, _ = depthwise_separable()
    model = canonicalize(model)
    index = analyze(model)
    keep = random_valid_plan(index, np.random.default_rng(1), 0.4, 0.6)
    pruned = apply_plan(model, index, keep)
    name = model.graph.input[0].name
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(3)
    calib = from_iterable([(item, None) for item in rng.standard_normal((10, 1, *shape[1:])).astype(np.float32)])
    held = rng.standard_normal((40, 1, *shape[1:])).astype(np.float32)
    errors = {}
    for copies in (0, 7):
        out, report = recover(model, pruned, index, keep, calib, method="lstsq", augment=copies, batch_size=1,
                              intra_op_threads=1)
        assert report.samples == 10 * (copies + 1)
        refit = {c.node for c in report.consumers if c.alpha is not None}
        reference = recovered_reference(model, out, index, keep, refit)
        assert_same_outputs(reference, out, {name: held[0]}, rtol=1e-4, atol=1e-5)
        got = np.concatenate([run_ort(out, {name: h})[0] for h in held])
        truth = np.concatenate([run_ort(model, {name: h})[0] for h in held])
        errors[copies] = float(np.sum((got - truth) ** 2) / np.sum(truth ** 2))
    assert errors[7] < errors[0]

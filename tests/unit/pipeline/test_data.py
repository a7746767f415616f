"""Tests of pipeline.data.datasets: loaders on real data (shipped MNIST, PIL-written images), layouts, errors, determinism."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pipeline.data.datasets import (
    Dataset,
    check_against_model,
    from_image_folder,
    from_iterable,
    from_npz,
    mnist_path,
    require_labels,
    validate_batch,
)
from pipeline.data.named import open_dataset
from pipeline.errors import CalibrationError, UserInputError

MNIST_INPUTS = {"input": ((None, 1, 28, 28), np.float32)}


def _all(dataset: Dataset, batch_size: int = 64) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    feeds, labels = [], []
    for f, lab in dataset.batches(batch_size):
        feeds.append(f)
        labels.append(lab)
    merged = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    return merged, None if labels[0] is None else np.concatenate(labels)


class TestShippedMnist:
    def test_splits_have_the_documented_sizes(self) -> None:
        train = from_npz(mnist_path(), split="train")
        test = from_npz(mnist_path(), split="test")
        assert (train.num_samples, test.num_samples) == (8000, 2000)
        assert train.num_classes == 10
        raw = np.load(mnist_path())
        np.testing.assert_array_equal(test.labels, raw["y"][8000:])

    def test_default_conversion_is_x_over_255_with_channel_axis(self) -> None:
        data = from_npz(mnist_path(), split="train", limit=10)
        feeds, labels = _all(data, 4)
        raw = np.load(mnist_path())
        assert feeds["x"].shape == (10, 1, 28, 28) and feeds["x"].dtype == np.float32
        np.testing.assert_allclose(feeds["x"][:, 0], raw["x"][:10] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(labels, raw["y"][:10])

    def test_mean_std_follow_the_stated_formula(self) -> None:
        data = from_npz(mnist_path(), mean=0.1307, std=0.3081, split="test", limit=5)
        feeds, _ = _all(data)
        raw = np.load(mnist_path())["x"][8000:8005].astype(np.float64)
        np.testing.assert_allclose(feeds["x"][:, 0], (raw / 255 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)

    def test_iteration_is_deterministic_and_covers_every_sample_once(self) -> None:
        data = from_npz(mnist_path(), split="test", limit=100)
        first, second = _all(data, 32), _all(data, 7)
        np.testing.assert_array_equal(first[0]["x"], second[0]["x"])
        np.testing.assert_array_equal(first[1], second[1])
        assert [len(lab) for _, lab in data.batches(32)] == [32, 32, 32, 4]

    def test_labels_are_read_only(self) -> None:
        data = from_npz(mnist_path(), split="train", limit=3)
        with pytest.raises(ValueError, match="read-only"):
            data.labels[0] = 5


@pytest.mark.parametrize(
    ("stored_shape", "layout", "to_nchw"),
    [
        ((4, 6, 5), "auto", lambda a: a[:, None]),
        ((4, 6, 5, 3), "auto", lambda a: a.transpose(0, 3, 1, 2)),
        ((4, 6, 5, 1), "auto", lambda a: a.transpose(0, 3, 1, 2)),
        ((4, 3, 6, 5), "auto", lambda a: a),
        ((4, 6, 5, 2), "HWC", lambda a: a.transpose(0, 3, 1, 2)),
        ((4, 2, 6, 5), "CHW", lambda a: a),
        ((4, 6, 5), "HW", lambda a: a[:, None]),
        ((4, 7), "auto", lambda a: a),
    ],
    ids=["NHW-auto", "NHWC3-auto", "NHWC1-auto", "NCHW-auto", "HWC", "CHW", "HW", "features"],
)
def test_layouts_become_nchw(tmp_path: Path, stored_shape: tuple[int, ...], layout: str, to_nchw) -> None:
    raw = np.random.default_rng(0).integers(0, 256, stored_shape, dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=raw, y=np.arange(4))
    feeds, _ = _all(from_npz(tmp_path / "d.npz", layout=layout))
    np.testing.assert_allclose(feeds["images"], to_nchw(raw.astype(np.float32) / 255), rtol=1e-6)


def test_per_channel_mean_std_and_explicit_scale(tmp_path: Path) -> None:
    raw = np.full((2, 4, 4, 3), 100, dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=raw)
    data = from_npz(tmp_path / "d.npz", scale=1.0, mean=[10, 20, 30], std=[2, 4, 5])
    feeds, labels = _all(data)
    assert labels is None and data.num_classes is None
    np.testing.assert_allclose(feeds["x"][0, :, 0, 0], [45.0, 20.0, 14.0])


def test_explicit_split_arrays_win_over_the_index_convention(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x_train=np.zeros((3, 2, 2), np.uint8), y_train=np.array([0, 1, 1]),
             x_test=np.ones((2, 2, 2), np.uint8), y_test=np.array([2, 0]))  # fmt: skip
    test = from_npz(tmp_path / "d.npz", split="test")
    assert test.num_samples == 2 and test.num_classes == 3
    assert from_npz(tmp_path / "d.npz", split="train").num_samples == 3


def test_index_split_needs_more_samples_than_the_training_part(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 2, 2), np.uint8), y=np.zeros(10, np.int64))
    with pytest.raises(CalibrationError, match="split"):
        from_npz(tmp_path / "d.npz", split="train")


def test_input_map_names_feeds_and_binds_multi_input(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "d.npz",
        a=np.zeros((3, 2), np.float32),
        b=np.ones((3, 5), np.float32),
        y=np.array([0, 1, 0]),
    )
    data = from_npz(tmp_path / "d.npz", input_map={"a": "left", "b": "right"})
    inputs = {"left": ((None, 2), np.float32), "right": ((None, 5), np.float32)}
    bound = check_against_model(data, inputs)
    feeds, _ = next(bound.batches(2))
    assert sorted(feeds) == ["left", "right"] and feeds["right"].shape == (2, 5)


@pytest.mark.parametrize(
    ("arrays", "kwargs", "error", "match"),
    [
        ({"x": np.zeros((3, 2)), "y": np.zeros(4, np.int64)}, {}, CalibrationError, "different numbers"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.0, 1.0, 1.0])}, {}, CalibrationError, "integer"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 1])}, {}, CalibrationError, "non-negative"),
        ({"x": np.zeros((3, 2))}, {"input_map": {"z": "input"}}, UserInputError, "not found"),
        ({"x": np.zeros((3, 2))}, {"labels_key": "target"}, UserInputError, "target"),
        ({"x": np.zeros((3, 2))}, {"layout": "NWHC"}, UserInputError, "layout"),
    ],
    ids=[
        "count-mismatch",
        "float-labels",
        "negative-labels",
        "unknown-input",
        "unknown-labels",
        "bad-layout",
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict, kwargs: dict, error: type, match: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(error, match=match):
        from_npz(tmp_path / "d.npz", **kwargs)


def test_missing_or_broken_npz_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="not found"):
        from_npz(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserInputError, match="not a readable"):
        from_npz(tmp_path / "bad.npz")


def _write_folder(root: Path) -> None:
    from PIL import Image

    colours = {"cat": (255, 0, 0), "ant": (0, 0, 255)}
    for cls, colour in colours.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate([(40, 30), (30, 50)]):
            Image.new("RGB", (w, h), colour).save(root / cls / f"{i}.png")
    (root / "ant" / "notes.txt").write_text("not an image")


class TestImageFolder:
    def test_classes_sorted_resize_crop_normalise(self, tmp_path: Path) -> None:
        _write_folder(tmp_path)
        data = from_image_folder(tmp_path, size=32, crop=24, mean=[0.5, 0.5, 0.5], std=[0.5, 0.25, 0.5])
        feeds, labels = _all(data)
        assert data.num_samples == 4 and data.num_classes == 2
        np.testing.assert_array_equal(labels, [0, 0, 1, 1])  # "ant" < "cat"
        assert feeds["image"].shape == (4, 3, 24, 24) and feeds["image"].dtype == np.float32
        np.testing.assert_allclose(feeds["image"][0, :, 5, 5], [-1.0, -2.0, 1.0], atol=1e-6)  # blue ant
        np.testing.assert_allclose(feeds["image"][3, :, 5, 5], [1.0, -2.0, -1.0], atol=1e-6)  # red cat

    def test_bgr_and_grayscale(self, tmp_path: Path) -> None:
        _write_folder(tmp_path)
        bgr = from_image_folder(
            tmp_path, size=24, crop=(20, 16), mean=[0, 0, 0], std=[1, 1, 1], channel_order="BGR"
        )
        feeds, _ = _all(bgr)
        assert feeds["image"].shape == (4, 3, 20, 16)
        np.testing.assert_allclose(feeds["image"][3, :, 0, 0], [0.0, 0.0, 1.0], atol=1e-6)
        gray = from_image_folder(tmp_path, size=24, crop=8, mean=[0], std=[1], channel_order="L", limit=1)
        assert _all(gray)[0]["image"].shape == (1, 1, 8, 8)

    def test_errors(self, tmp_path: Path) -> None:
        with pytest.raises(UserInputError, match="not found"):
            from_image_folder(tmp_path / "nope", size=8, crop=8, mean=[0] * 3, std=[1] * 3)
        with pytest.raises(UserInputError, match="no images"):
            from_image_folder(tmp_path, size=8, crop=8, mean=[0] * 3, std=[1] * 3)
        _write_folder(tmp_path / "f")
        too_big = from_image_folder(tmp_path / "f", size=8, crop=9, mean=[0] * 3, std=[1] * 3)
        with pytest.raises(UserInputError, match="crop"):
            _all(too_big)


class TestIterable:
    def test_generator_of_arrays_is_materialised(self) -> None:
        rng = np.random.default_rng(1)
        parts = [(rng.normal(size=(3, 1, 4, 4)).astype(np.float32), np.array([0, 1, 2])) for _ in range(3)]
        data = from_iterable(iter(parts), name="gen")
        feeds, labels = _all(data, 4)
        assert data.num_samples == 9 and data.num_classes == 3
        np.testing.assert_array_equal(feeds["input"], np.concatenate([p[0] for p in parts]))
        assert _all(data, 5)[1].tolist() == labels.tolist()  # still iterable a second time

    def test_dict_inputs_without_labels(self) -> None:
        data = from_iterable([({"a": np.zeros((2, 3)), "b": np.ones((2, 1))}, None)])
        assert data.labels is None and sorted(data.feed_names) == ["a", "b"]

    @pytest.mark.parametrize(
        ("items", "match"),
        [
            ([], "no batches"),
            ([(np.zeros((2, 3)), np.array([0, 1])), (np.zeros((2, 3)), None)], "some batches"),
            ([(np.zeros((2, 3)), np.array([0.5, 1.0]))], "integer"),
            ([(np.zeros((2, 3)), np.array([0]))], "different numbers"),
            ([({"a": np.zeros((1, 3))}, None), ({"b": np.zeros((1, 3))}, None)], "share inputs"),
        ],
        ids=["empty", "partial-labels", "float-labels", "count-mismatch", "key-change"],
    )
    def test_errors(self, items: list, match: str) -> None:
        with pytest.raises(CalibrationError, match=match):
            from_iterable(items)


class TestCheckAgainstModel:
    def test_binds_single_array_to_the_model_input(self) -> None:
        data = check_against_model(from_npz(mnist_path(), split="test", limit=8), MNIST_INPUTS, max_batches=1)
        assert data.input_name == "input" and data.feed_names == ("input",)
        assert list(next(data.batches(8))[0]) == ["input"]

    @pytest.mark.parametrize(
        ("inputs", "match"),
        [
            (
                {"input": ((None, 1, 32, 32), np.float32)},
                r"expects shape \[N, 1, 32, 32\], got \[3, 1, 28, 28\]",
            ),
            ({"input": ((None, 28, 28), np.float32)}, "expects shape"),
            ({"input": ((None, 1, 28, 28), np.float16)}, "expects dtype float16, got float32"),
            ({"a": ((None, 1, 28, 28), np.float32), "b": ((None, 1), np.float32)}, "model has inputs"),
        ],
        ids=["spatial", "rank", "dtype", "inputs"],
    )
    def test_mismatch_names_input_expected_and_got(self, inputs: dict, match: str) -> None:
        with pytest.raises(CalibrationError, match=match):
            check_against_model(from_npz(mnist_path(), split="test", limit=3), inputs)

    def test_nan_and_inf_are_rejected(self) -> None:
        x = np.zeros((4, 1, 28, 28), np.float32)
        x[2, 0, 3, 3] = np.inf
        with pytest.raises(CalibrationError, match="NaN or Inf"):
            check_against_model(from_iterable([(x, np.arange(4))]), MNIST_INPUTS)
        x[2, 0, 3, 3] = np.nan
        with pytest.raises(CalibrationError, match="'input' contains NaN"):
            validate_batch({"input": x}, MNIST_INPUTS)

    def test_empty_dataset(self) -> None:
        with pytest.raises(CalibrationError, match="no samples"):
            check_against_model(from_npz(mnist_path(), split="test", limit=0), MNIST_INPUTS)


def test_require_labels() -> None:
    assert require_labels(from_npz(mnist_path(), split="train", limit=50)).shape == (50,)
    with pytest.raises(CalibrationError, match="no labels"):
        require_labels(from_iterable([(np.zeros((2, 3)), None)]))
    with pytest.raises(CalibrationError, match="one class"):
        require_labels(from_iterable([(np.zeros((2, 3)), np.array([1, 1]))]))


def _session_inputs(session: ort.InferenceSession) -> dict:
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    return {
        i.name: (tuple(d if isinstance(d, int) else None for d in i.shape), dtypes[i.type])
        for i in session.get_inputs()
    }


def test_shipped_demo_model_accuracy_through_onnxruntime() -> None:
    path = mnist_path().with_name("mnist_cnn.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    data = from_npz(mnist_path(), mean=0.1307, std=0.3081, split="test", limit=500)
    data = check_against_model(data, _session_inputs(session))
    correct = sum(int((session.run(None, f)[0].argmax(1) == lab).sum()) for f, lab in data.batches(250))
    assert correct / data.num_samples >= 0.97


class TestOpenDataset:
    def test_mnist_defaults_to_training_split_with_demo_normalisation(self) -> None:
        data = open_dataset("mnist", limit=4)
        feeds, labels = _all(data)
        raw = np.load(mnist_path())
        np.testing.assert_allclose(
            feeds["x"][:, 0], (raw["x"][:4] / 255 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_array_equal(labels, raw["y"][:4])
        assert open_dataset("mnist", split="test").num_samples == 2000
        assert open_dataset("mnist", split="all").num_samples == 10000

    def test_npz_default_split_depends_on_the_file(self, tmp_path: Path) -> None:
        np.savez(tmp_path / "plain.npz", x=np.zeros((5, 2), np.float32), y=np.arange(5))
        np.savez(tmp_path / "split.npz", x_train=np.zeros((3, 2), np.float32), y_train=np.arange(3),
                 x_test=np.zeros((2, 2), np.float32), y_test=np.arange(2))  # fmt: skip
        assert open_dataset(tmp_path / "plain.npz").num_samples == 5
        assert open_dataset(str(tmp_path / "split.npz")).num_samples == 3
        assert open_dataset(tmp_path / "split.npz", split="test").num_samples == 2

    def test_image_folder_uses_split_subfolder_and_given_geometry(self, tmp_path: Path) -> None:
        _write_folder(tmp_path / "test")
        data = open_dataset(tmp_path, split="test", size=16, crop=12, mean=[0.0], std=[1.0])
        assert _all(data)[0]["image"].shape == (4, 3, 12, 12)
        with pytest.raises(UserInputError, match="scale"):
            open_dataset(tmp_path, scale=1.0)

    def test_unknown_spec(self, tmp_path: Path) -> None:
        with pytest.raises(UserInputError, match="not found: give 'mnist'"):
            open_dataset(tmp_path / "nothing.npz")


class TestDataSpec:
    """What a Ray worker receives: a small spec it reopens by itself, giving the same samples."""

    @staticmethod
    def _same(a: Dataset, b: Dataset) -> None:
        fa, la = _all(a, 5)
        fb, lb = _all(b, 5)
        assert a.num_samples == b.num_samples and sorted(fa) == sorted(fb)
        for key in fa:
            np.testing.assert_array_equal(fa[key], fb[key])
        np.testing.assert_array_equal(la, lb)

    def test_npz_with_task_binding_and_ranges_reopens_to_the_same_samples(self) -> None:
        from pipeline.data.task import Task

        data = Task(classes=(3, 8)).dataset(open_dataset("mnist", split="train", limit=300)).data
        part = data.bind(["input"]).subset(10, 60).subset(5, 37)
        assert part.spec is not None and [s[0] for s in part.spec.steps] == ["task", "bind", "range", "range"]
        assert len(pickle.dumps(part.spec)) < 1000  # a spec, not arrays
        reopened = part.spec.open()
        assert reopened.feed_names == ("input",) and set(reopened.labels.tolist()) <= {0, 1}
        self._same(part, reopened)

    def test_image_folder_reopens_to_the_same_samples(self, tmp_path: Path) -> None:
        _write_folder(tmp_path)
        data = from_image_folder(tmp_path, size=16, crop=12, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]).subset(1, 4)
        self._same(data, data.spec.open())

    def test_in_memory_data_has_no_spec(self) -> None:
        assert from_iterable([(np.zeros((2, 3), np.float32), np.array([0, 1]))]).spec is None

    def test_uncompressed_npz_arrays_are_memory_mapped_and_equal_compressed_ones(self, tmp_path: Path) -> None:
        x = np.random.default_rng(0).integers(0, 255, (9, 4, 5, 3), dtype=np.uint8)
        np.savez(tmp_path / "plain.npz", x=x, y=np.arange(9) % 2)
        np.savez_compressed(tmp_path / "packed.npz", x=x, y=np.arange(9) % 2)
        plain, packed = from_npz(tmp_path / "plain.npz"), from_npz(tmp_path / "packed.npz")
        self._same(plain, packed)
        from pipeline.data.npz import _read_npz

        assert isinstance(_read_npz(tmp_path / "plain.npz")["x"], np.memmap)
        assert not isinstance(_read_npz(tmp_path / "packed.npz")["x"], np.memmap)
        np.testing.assert_array_equal(_read_npz(tmp_path / "plain.npz")["x"], x)

    def test_a_range_outside_the_data_is_refused(self) -> None:
        with pytest.raises(UserInputError, match="outside"):
            open_dataset("mnist", limit=10).subset(5, 11)

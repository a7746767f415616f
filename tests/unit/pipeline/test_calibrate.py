"""Streaming calibration: equals a one-shot numpy computation, pooling layout, every error and warning."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graph_ops.channels import analyze
from graph_ops.io import sha256_file
from graph_ops.probes import add_pooled_probes, expose_tensors
from pipeline.calibration.calibrate import calibrate, channel_summaries
from pipeline.calibration.stats import CalibrationStats
from pipeline.data.datasets import from_iterable
from pipeline.data.targets import LabelOptions
from pipeline.errors import CalibrationError, UserInputError
from pipeline.model.prepare import default_probes, prepare
from tests.graphs import tiny_classifier

CLASSES = 3
PROBES = ("r1", "r2")


def _conv_net(path: Path, *, w1_scale: float = 1.0) -> Path:
    """input(N,2,8,8) -> Conv(4) -> Relu -> Conv(6) -> Relu -> GAP -> Flatten -> Gemm(3) -> logits."""
    return Path(tiny_classifier(str(path), in_channels=2, widths=(4, 6), classes=CLASSES, w1_scale=w1_scale))


def _data(n: int = 60, *, seed: int = 1, shape: tuple[int, ...] = (2, 8, 8), labels: bool = True,
          num_classes: int = CLASSES) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = (np.arange(n) % num_classes).astype(np.int64) if labels else None
    return x, y


def _dataset(x: np.ndarray, y: np.ndarray | None, chunk: int = 7):
    """A real pipeline.data.datasets Dataset over (x, y), delivered in uneven chunks."""
    items = [({"input": x[i:i + chunk]}, None if y is None else y[i:i + chunk]) for i in range(0, len(x), chunk)]
    return from_iterable(items, name="test-data")


def _calibrate(model: Path, x: np.ndarray, y: np.ndarray | None, **options: object) -> CalibrationStats:
    """Calibrate with the test defaults: the two ReLU probes, one thread, no progress bar."""
    settings = {"probes": PROBES, "progress": False, "intra_op_threads": 1, **options}
    return calibrate(model, _dataset(x, y), **settings)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return _conv_net(tmp_path / "tiny.onnx")


def _activations(path: Path, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    exposed = expose_tensors(onnx.load(str(path)), names)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(names, {"input": x})


def _avg2_numpy(act: np.ndarray) -> np.ndarray:
    """Channel-major 2x2 average pooling of (N, C, 8, 8), written out cell by cell."""
    n, c = act.shape[:2]
    out = np.zeros((n, c * 4))
    for ch in range(c):
        for i in range(2):
            for j in range(2):
                out[:, ch * 4 + i * 2 + j] = act[:, ch, 4 * i:4 * i + 4, 4 * j:4 * j + 4].astype(np.float64).mean((1, 2))
    return out


@pytest.mark.parametrize("pooling", ["gap", "avg2"])
def test_streamed_statistics_equal_one_shot_numpy(model: Path, pooling: str) -> None:
    x, y = _data()
    stats = _calibrate(model, x, y, pooling=pooling, batch_size=16, backend="ort-cpu")
    assert set(stats.probes) == {"r1", "r2"}
    assert (stats.num_classes, stats.pooling, stats.model_sha256) == (CLASSES, pooling, sha256_file(model))
    # rows are summed in float32 inside the graph, then in float64 (graph_ops.probes): float32's relative rounding
    for name, act in zip(["r1", "r2"], _activations(model, x, ["r1", "r2"]), strict=True):
        feats = act.astype(np.float64).mean((2, 3)) if pooling == "gap" else _avg2_numpy(act)
        probe = stats.probes[name]
        assert (probe.n, probe.cells, probe.elements) == (60, 1 if pooling == "gap" else 4, 60 * 64)
        np.testing.assert_array_equal(probe.class_counts, [20, 20, 20])
        np.testing.assert_allclose(probe.sum, feats.sum(0), rtol=1e-6)
        np.testing.assert_allclose(probe.class_sums, np.stack([feats[y == k].sum(0) for k in range(CLASSES)]),
                                   rtol=1e-6)
        np.testing.assert_allclose(probe.gram, feats.T @ feats, rtol=1e-6)
        np.testing.assert_array_equal(probe.zeros, (act == 0).sum((0, 2, 3)))
        np.testing.assert_allclose(probe.abs_sum, np.abs(act.astype(np.float64)).sum((0, 2, 3)), rtol=1e-6)


def test_same_inputs_give_identical_statistics_and_model_file_is_untouched(model: Path) -> None:
    before = model.read_bytes()
    x, y = _data()
    runs = [_calibrate(model, x, y, pooling="avg2") for _ in range(2)]
    runs.append(_calibrate(prepare(model), x, y, pooling="avg2"))
    for name in runs[0].probes:
        np.testing.assert_array_equal(runs[0].probes[name].gram, runs[1].probes[name].gram)
        np.testing.assert_array_equal(runs[0].probes[name].gram, runs[2].probes[name].gram)
        np.testing.assert_array_equal(runs[0].probes[name].class_sums, runs[1].probes[name].class_sums)
    assert model.read_bytes() == before


def test_default_probes_are_those_of_the_prunable_groups(model: Path) -> None:
    canonical = onnx.load(str(model))
    expected = [p for g in analyze(canonical).groups if g.prunable for p in g.probes]
    assert list(default_probes(analyze(canonical))) == list(dict.fromkeys(expected))
    assert list(prepare(model).probes) == list(dict.fromkeys(expected))
    assert "r1" in expected


def test_explicit_two_dimensional_probe_has_one_cell(model: Path) -> None:
    x, y = _data()
    stats = _calibrate(model, x, y, probes=["logits"], pooling="avg2")
    (logits,) = _activations(model, x, ["logits"])
    probe = stats.probes["logits"]
    assert (probe.cells, probe.elements) == (1, 60)
    assert logits.min() < 0  # signed: the absolute sums take their own pass
    np.testing.assert_allclose(probe.sum, logits.astype(np.float64).sum(0), rtol=1e-12)
    np.testing.assert_allclose(probe.abs_sum, np.abs(logits.astype(np.float64)).sum(0), rtol=1e-12)


@pytest.mark.parametrize("shape", [(5, 3, 4, 6), (5, 3, 7), (5, 3)], ids=["4d", "3d", "2d"])
def test_channel_summaries_equal_numpy_on_signed_data_with_zeros(shape: tuple[int, ...]) -> None:
    act = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    act[act < -0.5] = 0.0
    axes = (0, *range(2, act.ndim))
    sums, zeros, abs_sum = channel_summaries(act)
    np.testing.assert_allclose(sums, act.astype(np.float64).reshape(5, 3, -1).sum(2), rtol=1e-12)
    np.testing.assert_array_equal(zeros, (act == 0).sum(axes))
    np.testing.assert_allclose(abs_sum, np.abs(act.astype(np.float64)).sum(axes), rtol=1e-12)
    assert zeros.sum() > 0


@pytest.mark.slow  # imports torch (seconds, once per session)
@pytest.mark.parametrize("size", [(7, 7), (8, 5), (3, 9)], ids=["7x7", "8x5", "3x9"])
@pytest.mark.parametrize("k", [2, 4])
def test_in_graph_adaptive_pooling_matches_torch(size: tuple[int, int], k: int) -> None:
    """The bin sums add_pooled_probes computes inside the graph, divided by the bin sizes, are torch's
    adaptive_avg_pool2d (overlapping bins included)."""
    torch = pytest.importorskip("torch")
    act = np.random.default_rng(3).standard_normal((2, 3, *size)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["a"], name="relu"), onnx.helper.make_node("Neg", ["a"], ["y"])],
        "pool", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, *size])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, *size])])
    model = onnx.shape_inference.infer_shapes(onnx.helper.make_model(graph, opset_imports=[
        onnx.helper.make_opsetid("", 17)]))
    pooled, (probe,) = add_pooled_probes(model, ["a"], bins=k, summaries=True)
    session = ort.InferenceSession(pooled.SerializeToString(), providers=["CPUExecutionProvider"])
    sums, shape, nonzero, abs_sum = session.run([probe.sums, probe.shape, probe.nonzero, probe.abs_sum], {"x": act})
    relu = np.maximum(act, 0)
    expected = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(relu).double(), k).numpy()
    np.testing.assert_allclose(sums.reshape(2, 3, -1) / np.asarray(probe.bin_sizes), expected.reshape(2, 3, -1),
                               rtol=1e-6)
    assert tuple(shape) == (2, 3, *size)
    np.testing.assert_array_equal(nonzero, (relu != 0).sum((2, 3)))
    np.testing.assert_allclose(abs_sum, relu.astype(np.float64).sum((2, 3)), rtol=1e-6)


def _bad_case(kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    x, y = _data()
    if kind == "shape":
        return _data(shape=(2, 9, 9))
    if kind == "dtype":
        return x.astype(np.float64), y
    if kind == "nan":
        x[5, 0, 0, 0] = np.nan
        return x, y
    if kind == "label-range":
        return x, np.where(y == 2, CLASSES, y)
    if kind == "negative-label":
        return x, y - 1
    return x, np.full_like(y, 2)  # one class


@pytest.mark.parametrize(("kind", "message"), [
    ("shape", r"input 'input' expects shape \[N, 2, 8, 8\], got \[60, 2, 9, 9\]"),
    ("dtype", "input 'input' expects dtype float32, got float64"),
    ("nan", "input 'input' contains NaN or Inf"),
    ("label-range", "label 3 is out of range: the model has 3 classes"),
    ("negative-label", "non-negative class ids, (found|got) -1"),
    ("one-class", "same label.*at least two classes"),
], ids=["shape", "dtype", "nan", "label-range", "negative-label", "one-class"])
def test_bad_data_is_a_calibration_error(model: Path, kind: str, message: str) -> None:
    x, y = _bad_case(kind)
    with pytest.raises(CalibrationError, match=message):
        _calibrate(model, x, y)


def test_unlabelled_data_with_labels_data_is_refused(model: Path) -> None:
    x, _ = _data()
    with pytest.raises(UserInputError, match=r"--labels data: the data 'test-data' has no labels"):
        _calibrate(model, x, None, labels=LabelOptions(source="data"))


def test_one_class_of_model_decisions_is_named(model: Path) -> None:
    x, _ = _data()  # the untrained tiny model decides one class for every sample
    with pytest.raises(CalibrationError, match=r"the model's own decisions.*one class"):
        _calibrate(model, x, None)


def test_overflowing_activation_names_the_tensor(tmp_path: Path) -> None:
    path = _conv_net(tmp_path / "overflow.onnx", w1_scale=1e20)
    x = np.full((4, 2, 8, 8), 1e20, np.float32)
    with pytest.raises(CalibrationError, match="activation 'r1' has NaN or Inf"):
        _calibrate(path, x, np.arange(4) % CLASSES)


def test_unlabelled_statistics_when_labels_are_not_required(model: Path) -> None:
    x, _ = _data(n=12)
    stats = _calibrate(model, x, None, require_labels=False)
    assert stats.probes["r1"].n == 12
    assert int(np.asarray(stats.probes["r1"].class_counts).sum()) == 12


def test_small_sample_counts_are_warned(model: Path, caplog: pytest.LogCaptureFixture) -> None:
    x, y = _data(n=12)
    with caplog.at_level(logging.WARNING, logger="pipeline.calibration.calibrate"):
        _calibrate(model, x, y, pooling="avg2")
    text = caplog.text
    assert "only 12 calibration samples for probe 'r2' with 24 features" in text
    assert "about 240 (10 per feature)" in text
    assert "class 0 has only 4 calibration samples (fewer than 5 per class)" in text


def test_enough_samples_give_no_warning(model: Path, caplog: pytest.LogCaptureFixture) -> None:
    x, y = _data(n=60)
    with caplog.at_level(logging.WARNING, logger="pipeline.calibration.calibrate"):
        _calibrate(model, x, y, pooling="gap")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("option", "message"), [({"pooling": "max"}, "unknown pooling 'max'"),
                                                 ({"backend": "tpu"}, "unknown backend 'tpu'"),
                                                 ({"probes": ["nope"]}, "cannot expose tensor 'nope'")],
                         ids=["pooling", "backend", "probe"])
def test_bad_options_are_user_errors(model: Path, option: dict, message: str) -> None:
    x, y = _data(n=6)
    with pytest.raises(UserInputError, match=message):
        _calibrate(model, x, y, **option)


def test_missing_model_file_is_a_user_error(tmp_path: Path) -> None:
    x, y = _data(n=6)
    with pytest.raises(UserInputError, match="model file not found"):
        _calibrate(tmp_path / "absent.onnx", x, y)

"""Latency harness: statistics, interleaved rounds, per-pair ratios, report schema, warnings, inputs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_ops.errors import UserInputError
from pipeline.deployment.bench import FORMAT, LatencyStats, machine_info, measure, width_warnings
from pipeline.model.runtime import make_feeds, make_session

FAST = {"warmup_s": 0.0, "min_duration_s": 0.05, "min_iters": 6, "threads": 1}


def _conv_model(path: Path, width: int, *, batch: int | str = "N", size: int = 4) -> Path:
    """input(batch x 1 x size x size) -> Conv(width, 3x3) -> Relu -> Conv(2, 1x1) -> output."""
    rng = np.random.default_rng(width)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (width, 1, 3, 3)), ("b1", (width,)), ("w2", (2, width, 1, 1)))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["output"], name="conv2")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 2, size, size])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


@pytest.fixture
def two_models(tmp_path: Path) -> tuple[str, str]:
    return str(_conv_model(tmp_path / "a.onnx", 16)), str(_conv_model(tmp_path / "b.onnx", 6))


@pytest.mark.parametrize(
    "samples",
    [np.array([0.003, 0.001, 0.002, 0.010, 0.004]), np.linspace(1e-3, 2e-3, 101),
     np.random.default_rng(0).lognormal(-6, 0.3, 257), np.array([0.005])],
    ids=["five", "linear-101", "lognormal-257", "single"],
)
def test_latency_stats_match_numpy(samples: np.ndarray) -> None:
    stats = LatencyStats.from_samples(samples, batch=8)
    p50, p90, p95, p99 = np.percentile(samples, [50, 90, 95, 99])
    assert (stats.median_s, stats.p90_s, stats.p95_s, stats.p99_s) == pytest.approx((p50, p90, p95, p99))
    assert (stats.mean_s, stats.min_s, stats.max_s) == pytest.approx((samples.mean(), samples.min(), samples.max()))
    expected_cv = samples.std(ddof=1) / samples.mean() if samples.size > 1 else 0.0
    assert stats.cv == pytest.approx(expected_cv)
    assert stats.throughput == pytest.approx(8 / samples.mean())
    assert stats.n == samples.size


@pytest.mark.parametrize("bad", [np.array([]), np.array([0.1, np.nan]), np.ones((2, 2))],
                         ids=["empty", "nan", "2d"])
def test_latency_stats_reject_bad_samples(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="non-empty 1-D"):
        LatencyStats.from_samples(bad)


def test_rounds_are_interleaved_and_ratios_taken_per_round(two_models: tuple[str, str]) -> None:
    a, b = two_models
    report = measure([a, b], "ort-cpu", (1, 2), rounds=3, **FAST)
    assert report.schedule == tuple((r, i, batch) for batch in (1, 2) for r in range(3) for i in (0, 1))
    for batch in (1, 2):
        base, other = report.result(a, batch), report.result(b, batch)
        assert len(base.round_medians_s) == 3 and other.latency.n >= FAST["min_iters"]
        comparison = next(c for c in report.comparisons if c.batch == batch)
        expected = [m / n for m, n in zip(other.round_medians_s, base.round_medians_s, strict=True)]
        assert comparison.ratios == pytest.approx(expected)
        assert comparison.ratio == pytest.approx(np.median(expected))
        assert comparison.speedup == pytest.approx(1 / np.median(expected))
    assert len(report.comparisons) == 2


def test_minimum_duration_and_iterations_are_met(two_models: tuple[str, str]) -> None:
    report = measure([two_models[0]], "ort-cpu", (1,), warmup_s=0.0, min_duration_s=0.06, min_iters=50, rounds=4,
                     threads=1)
    stats = report.results[0].latency
    assert stats.n >= 50
    assert stats.mean_s * stats.n >= 0.06 * 0.9  # timed calls only; the loop overhead is outside them


def test_json_schema(two_models: tuple[str, str], tmp_path: Path) -> None:
    report = measure(list(two_models), "ort-cpu", (1,), rounds=2, **FAST)
    data = json.loads(report.to_json())
    assert data["format"] == FORMAT == "diprune.bench/1"
    assert set(data) == {"format", "backend", "settings", "machine", "models", "results", "comparisons",
                         "schedule", "warnings", "noise"}
    assert {"warmup_s", "min_duration_s", "min_iters", "rounds", "seed", "threads", "data"} <= set(data["settings"])
    assert {"cpu", "cores_logical", "cores_available", "versions"} <= set(data["machine"])
    assert data["machine"]["versions"]["onnxruntime"]
    assert data["models"][0]["providers"] == ["CPUExecutionProvider"]
    assert len(data["models"][0]["sha256"]) == 64
    latency = data["results"][1]["latency"]
    assert set(latency) == {"n", "mean_s", "median_s", "p90_s", "p95_s", "p99_s", "min_s", "max_s", "cv",
                            "throughput"}
    assert {"baseline", "model", "batch", "ratios", "ratio", "speedup"} == set(data["comparisons"][0])


def test_width_warning_names_odd_convs(two_models: tuple[str, str]) -> None:
    report = measure(list(two_models), "ort-cpu", (1,), rounds=1, round_to=8, **FAST)
    assert len(report.warnings) == 1
    assert report.warnings[0] == "b.onnx: 1 Conv layer(s) with output channels not multiples of 8: conv1=6"
    assert "WARNING: b.onnx" in report.to_markdown()
    wide = onnx.load(two_models[0])
    narrow = onnx.load(two_models[1])
    assert width_warnings(wide, "a", 8) == []  # the head conv (a graph output, 2 channels) is not counted
    assert width_warnings(wide, "a", 32) == ["a: 1 Conv layer(s) with output channels not multiples of 32: conv1=16"]
    assert width_warnings(narrow, "b", 2) == []
    assert width_warnings(narrow, "b", 1) == []


def test_markdown_has_one_row_per_model_and_batch(two_models: tuple[str, str]) -> None:
    report = measure(list(two_models), "ort-cpu", (1, 3), rounds=1, **FAST)
    rows = [ln for ln in report.to_markdown().splitlines() if ln.startswith("| a.onnx") or ln.startswith("| b.onnx")]
    assert len(rows) == 4
    assert sum("baseline" in row for row in rows) == 2


def test_inputs_from_npz_data_file(two_models: tuple[str, str], tmp_path: Path) -> None:
    x = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    np.savez(tmp_path / "data.npz", x=x, y=np.arange(3))
    session, _ = make_session(two_models[0], intra_op_threads=1)
    feeds = make_feeds(session, 5, data=np.load(tmp_path / "data.npz"))
    assert feeds["input"].shape == (5, 1, 4, 4) and feeds["input"].dtype == np.float32
    np.testing.assert_allclose(feeds["input"][:3, 0], x / 255.0, rtol=1e-6)
    np.testing.assert_allclose(feeds["input"][3:, 0], x[:2] / 255.0, rtol=1e-6)
    report = measure([two_models[0]], "ort-cpu", (2,), rounds=1, data=tmp_path / "data.npz", **FAST)
    assert report.settings["data"] == str(tmp_path / "data.npz")


def test_random_inputs_are_fixed_per_seed(two_models: tuple[str, str]) -> None:
    session, _ = make_session(two_models[0], intra_op_threads=1)
    first, again, other = (make_feeds(session, 2, seed=s)["input"] for s in (3, 3, 4))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_data_file_errors(two_models: tuple[str, str], tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="data file not found"):
        measure([two_models[0]], "ort-cpu", (1,), data=tmp_path / "missing.npz", **FAST)
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 5, 5), np.float32))
    with pytest.raises(UserInputError, match="sample shape"):
        measure([two_models[0]], "ort-cpu", (1,), data=tmp_path / "bad.npz", **FAST)


@pytest.mark.parametrize(
    ("backend", "message"),
    [("ort-gpu", "unknown backend 'ort-gpu'"), ("ort-cuda", "CUDAExecutionProvider"),
     ("ort-trt", "TensorrtExecutionProvider")],
    ids=["unknown", "cuda-not-active", "trt-ep-not-active"],
)
def test_bad_or_unavailable_backend_is_a_clear_error(two_models: tuple[str, str], backend: str, message: str) -> None:
    import onnxruntime as ort

    wanted = {"ort-cuda": "CUDAExecutionProvider", "ort-trt": "TensorrtExecutionProvider"}.get(backend)
    if wanted in ort.get_available_providers():
        pytest.skip(f"{wanted} is available here")
    with pytest.raises(UserInputError, match=message):
        measure([two_models[0]], backend, (1,), **FAST)


def test_tensorrt_backend_without_tensorrt_is_a_clear_error(two_models: tuple[str, str]) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(UserInputError, match=r"diprune\[trt\]"):
            measure([two_models[0]], "tensorrt", (1,), **FAST)
    else:
        pytest.skip("tensorrt is installed; tests/gpu covers it")


def test_fixed_batch_model_refuses_other_batches(tmp_path: Path) -> None:
    fixed = str(_conv_model(tmp_path / "fixed.onnx", 8, batch=1))
    assert measure([fixed], "ort-cpu", (1,), rounds=1, **FAST).results[0].batch == 1
    with pytest.raises(UserInputError, match="fixed batch of 1"):
        measure([fixed], "ort-cpu", (8,), **FAST)


def test_make_session_reports_active_providers_and_threads(two_models: tuple[str, str]) -> None:
    session, providers = make_session(Path(two_models[0]).read_bytes(), "ort-cpu", intra_op_threads=1,
                                      inter_op_threads=1)
    assert providers == ("CPUExecutionProvider",)
    assert session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(UserInputError, match="model file not found"):
        make_session("/nonexistent/model.onnx")


def test_machine_info_names_cpu_and_versions() -> None:
    info = machine_info()
    assert info["cores_available"] >= 1 and info["cpu"]
    assert "onnx" in info["versions"] and "numpy" in info["versions"]


def test_cli_bench_writes_json(two_models: tuple[str, str], tmp_path: Path) -> None:
    cli = pytest.importorskip("pipeline.cli", reason="the CLI's other stages are not importable yet",
                              exc_type=ImportError)
    out = tmp_path / "bench.json"
    code = cli.main(["-q", "bench", *two_models, "--batch", "1,2", "--warmup", "0", "--duration", "0.05",
                     "--iterations", "4", "--rounds", "2", "--threads", "1", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["results"]] == [1, 1, 2, 2]


def test_markdown_shows_gpu_compute_separately() -> None:
    from pipeline.deployment.bench import BenchReport, ModelResult

    stats = LatencyStats.from_samples(np.array([2e-3, 3e-3]), batch=1)
    gpu = LatencyStats.from_samples(np.array([1e-3, 1e-3]), batch=1)
    copy = LatencyStats.from_samples(np.array([2e-4, 2e-4]), batch=1)
    result = ModelResult(model="m.onnx", batch=1, latency=stats, round_medians_s=(2.5e-3,), gpu_compute=gpu,
                         h2d=copy, d2h=copy)
    report = BenchReport(backend="tensorrt", settings={}, machine={},
                         models=({"path": "m.onnx", "providers": ["TensorRT"]},), results=(result,), comparisons=(),
                         schedule=((0, 0, 1),))
    text = report.to_markdown()
    assert "GPU compute m.onnx batch 1: median 1.000 ms (H2D 0.200 ms, D2H 0.200 ms)" in text
    assert json.loads(report.to_json())["results"][0]["gpu_compute"]["median_s"] == pytest.approx(1e-3)


def test_width_warning_is_shortened_for_many_layers(tmp_path: Path) -> None:
    model = onnx.load(_conv_model(tmp_path / "m.onnx", 6))
    convs = [helper.make_node("Conv", ["output", "w2"], [f"extra{i}"], name=f"extra{i}") for i in range(10)]
    model.graph.node.extend(convs)
    (warning,) = width_warnings(model, "m", 8)
    assert warning.startswith("m: 11 Conv layer(s)") and warning.endswith("... (3 more)")

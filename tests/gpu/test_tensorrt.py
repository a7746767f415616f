"""TensorRT engine build/run and GPU backends of the harness (skipped without tensorrt, cuda-python or a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.gpu


def _require_tensorrt() -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'diprune[trt]')")
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        cudart = pytest.importorskip("cuda.cudart", reason="cuda-python is not installed")
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        pytest.skip("no CUDA device")


def _model(path: Path, width: int = 16) -> Path:
    """input(N x 3 x 16 x 16) -> Conv(width) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(10)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("w1", (width, 3, 3, 3)), ("b1", (width,)), ("w2", (10, width)), ("b2", (10,)))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]), helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"],
                                                                          transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                         ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_matches_onnxruntime(tmp_path: Path, precision: str) -> None:
    _require_tensorrt()
    from pipeline.deployment.bench import TRT_TOLERANCE
    from pipeline.deployment.engines import TrtRunner, build_engine
    from pipeline.model.runtime import make_session

    model = _model(tmp_path / "m.onnx")
    feeds = {"input": np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)}
    calibration = [{"input": np.random.default_rng(i).standard_normal((4, 3, 16, 16)).astype(np.float32)}
                   for i in range(4)]
    engine = build_engine(model, {"input": (4, 3, 16, 16)}, tmp_path / f"m.{precision}.engine",
                          precision=precision, timing_cache=tmp_path / "timing.cache",
                          calibration=calibration if precision == "int8" else None)
    assert engine.stat().st_size > 0 and (tmp_path / "timing.cache").stat().st_size > 0
    runner = TrtRunner(engine, feeds)
    runner()
    session, _ = make_session(model)
    ref = session.run(None, feeds)[0]
    err = np.abs(runner.outputs["logits"] - ref).max() / np.abs(ref).max()
    assert err <= TRT_TOLERANCE[precision]
    assert len(runner.gpu_compute_s) == 1 and runner.gpu_compute_s[0] > 0


def test_measure_tensorrt_reports_gpu_compute_separately(tmp_path: Path) -> None:
    _require_tensorrt()
    from pipeline.deployment.bench import measure

    a, b = _model(tmp_path / "a.onnx", 16), _model(tmp_path / "b.onnx", 8)
    report = measure([str(a), str(b)], "tensorrt", (1, 8), warmup_s=0.1, min_duration_s=0.2, min_iters=20,
                     rounds=2, precision="fp16")
    for result in report.results:
        assert result.gpu_compute is not None and result.h2d is not None and result.d2h is not None
        assert result.gpu_compute.median_s <= result.latency.median_s
    assert len(report.comparisons) == 2


def test_ort_cuda_provider_is_really_active(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    from pipeline.model.runtime import make_session

    _, providers = make_session(_model(tmp_path / "m.onnx"), "ort-cuda")
    assert providers[0] == "CUDAExecutionProvider"


@pytest.mark.parametrize("artifact", ["int8", "fp16"])
def test_edge_artifacts_build_and_match_onnxruntime(tmp_path: Path, artifact: str) -> None:
    """The TensorRT-recipe INT8 file (explicit quantization, no calibrator) and the FP16 file build and agree with
    onnxruntime CPU running the same file."""
    _require_tensorrt()
    from pipeline.data.named import open_dataset
    from pipeline.deployment.engines import TrtRunner, build_engine
    from pipeline.deployment.fp16 import convert_fp16
    from pipeline.deployment.quantize import Int8Quantizer
    from pipeline.model.runtime import make_session

    model = onnx.load(str(_model(tmp_path / "m.onnx")))
    rng = np.random.default_rng(1)
    if artifact == "int8":
        np.savez(tmp_path / "cal.npz", x=rng.standard_normal((64, 3, 16, 16)).astype(np.float32),
                 y=np.zeros(64, np.int64))
        quantizer = Int8Quantizer(model, open_dataset(str(tmp_path / "cal.npz")), samples=64, recipe="tensorrt")
        try:
            made = quantizer.quantize()
        finally:
            quantizer.close()
    else:
        made = convert_fp16(model)
    path = tmp_path / f"m.{artifact}.onnx"
    onnx.save(made, str(path))
    engine = build_engine(path, {"input": (4, 3, 16, 16)}, tmp_path / f"m.{artifact}.engine", precision=artifact)
    feeds = {"input": rng.standard_normal((4, 3, 16, 16)).astype(np.float32)}
    runner = TrtRunner(engine, feeds)
    runner()
    session, _ = make_session(path)
    ref = session.run(None, feeds)[0]
    assert np.abs(runner.outputs["logits"] - ref).max() / np.abs(ref).max() <= 0.05

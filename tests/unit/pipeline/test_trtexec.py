"""trtexec summary parsing on real saved trtexec output.

Fixture sources (public repositories, copied verbatim; in the first one the long "Trace details" list and most of
the option dump are elided, every line kept is unchanged):
- tests/fixtures/trtexec_tensorrt10_rtx6000.txt: NVIDIA/trt-samples-for-hackathon-cn,
  cookbook/07-Tool/trtexec/result-01.log (commit 8cef71260bb62584590a317505f04d7ca16ac657), TensorRT 10.16,
  RTX 6000 Ada.
- tests/fixtures/trtexec_tensorrt8_ait.txt: mjlovesz/sync-ait, ait/examples/cli/benchmark/08_trtexec/README.md
  (commit b055e49bc35acfc293ed908765aa42d9d089acc3), log lines prefixed by the ais_bench wrapper.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from graph_ops.errors import UserInputError
from pipeline.deployment.trtexec import find_trtexec, parse_summary, trtexec_command

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("trtexec_tensorrt10_rtx6000.txt",
         {"throughput_qps": 20235.1, "gpu_mean": 0.0305783, "gpu_median": 0.0286865, "gpu_p90": 0.034668,
          "gpu_p99": 0.0493164, "h2d_mean": 0.00420246, "d2h_p95": 0.00671387, "lat_max": 1.46887,
          "walltime_s": 3.00009, "gpu_total_s": 1.85632}),
        ("trtexec_tensorrt8_ait.txt",
         {"throughput_qps": 120.699, "gpu_mean": 8.23978, "gpu_median": 8.19409, "gpu_p90": 8.5354,
          "gpu_p99": 9.90002, "h2d_mean": 1.55492, "d2h_p95": 0.0163574, "lat_max": 11.7442,
          "walltime_s": 3.02405, "gpu_total_s": 3.00752}),
    ],
    ids=["tensorrt10", "tensorrt8-wrapped"],
)
def test_parse_real_summaries(name: str, expected: dict[str, float]) -> None:
    got = parse_summary((FIXTURES / name).read_text())
    assert got["throughput_qps"] == pytest.approx(expected["throughput_qps"])
    gpu = got["gpu_compute_time"]
    assert (gpu["mean"], gpu["median"], gpu["p90"], gpu["p99"]) == pytest.approx(
        (expected["gpu_mean"], expected["gpu_median"], expected["gpu_p90"], expected["gpu_p99"]))
    assert got["h2d_latency"]["mean"] == pytest.approx(expected["h2d_mean"])
    assert got["d2h_latency"]["p95"] == pytest.approx(expected["d2h_p95"])
    assert got["latency"]["max"] == pytest.approx(expected["lat_max"])
    assert got["total_host_walltime_s"] == pytest.approx(expected["walltime_s"])
    assert got["total_gpu_compute_time_s"] == pytest.approx(expected["gpu_total_s"])
    assert set(gpu) == {"min", "max", "mean", "median", "p90", "p95", "p99"}


def test_parse_reads_cv_warning_and_version() -> None:
    got = parse_summary((FIXTURES / "trtexec_tensorrt10_rtx6000.txt").read_text())
    assert got["gpu_compute_cv_percent"] == pytest.approx(29.8349)
    assert got["tensorrt_version"] == 101600
    # The trace lines before the summary ("GPU latency: ... ms") must not leak in as metrics.
    assert not any(key.startswith("average") for key in got)


def test_parse_old_multiline_layout() -> None:
    # Layout of TensorRT 7 logs (one statistic per line under a metric header); values made up.
    text = "\n".join(["[I] GPU Compute", "[I] min: 0.4 ms", "[I] max: 2.2 ms", "[I] mean: 0.5 ms",
                      "[I] median: 0.45 ms", "[I] percentile: 0.9 ms at 99%", "[I] total compute time: 2.9 s"])
    got = parse_summary(text)
    assert got["gpu_compute_time"] == pytest.approx({"min": 0.4, "max": 2.2, "mean": 0.5, "median": 0.45,
                                                     "p99": 0.9})
    assert got["total_gpu_compute_time_s"] == pytest.approx(2.9)


def test_parse_converts_units() -> None:
    got = parse_summary("[I] GPU Compute Time: min = 500 us, max = 0.002 s, mean = 1 ms, median = 1 ms")
    assert got["gpu_compute_time"] == pytest.approx({"min": 0.5, "max": 2.0, "mean": 1.0, "median": 1.0})


def test_parse_without_summary_is_a_clear_error() -> None:
    with pytest.raises(UserInputError, match="no trtexec performance summary"):
        parse_summary("[E] Error[4]: network build failed\n&&&& FAILED TensorRT.trtexec")


def test_command_needs_trtexec_or_builds_flags() -> None:
    if find_trtexec() is None:
        with pytest.raises(UserInputError, match="not on PATH"):
            trtexec_command("m.onnx")
        return
    cmd = trtexec_command("m.onnx", precision="fp16", shapes="input:8x3x224x224", engine="m.engine",
                          timing_cache="t.cache")
    assert {"--fp16", "--useCudaGraph", "--shapes=input:8x3x224x224", "--saveEngine=m.engine",
            "--timingCacheFile=t.cache"} <= set(cmd)

"""Which pooling `auto` gives each probe (pipeline.calibration.pooling): what its consumers read, and the small grid only where
the calibration set can estimate its features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from pipeline.calibration.calibrate import calibrate
from pipeline.calibration.pooling import MIN_SAMPLES_PER_FEATURE, consumer_bins
from pipeline.data.datasets import from_iterable
from pipeline.model.prepare import prepare
from tests.graphs import flatten_gemm, tiny_classifier


def _bins(model: str, probes: list[str], samples: int | None = None) -> dict[str, int]:
    prepared = prepare(model)  # a path
    return consumer_bins(prepared.model, prepared.index, probes, samples)


def test_conv_reader_gets_a_small_grid_and_global_pool_reader_the_average(tmp_path: Path) -> None:
    # r1 (8 channels, 8x8) is read by a 3x3 conv; r2 only by GlobalAveragePool
    path = tiny_classifier(str(tmp_path / "m.onnx"), in_channels=3, widths=(8, 16), classes=10)
    assert _bins(path, ["r1", "r2"]) == {"r1": 2, "r2": 1}


def test_small_grid_needs_ten_samples_per_feature(tmp_path: Path) -> None:
    path = tiny_classifier(str(tmp_path / "m.onnx"), in_channels=3, widths=(8, 16), classes=10)
    enough = MIN_SAMPLES_PER_FEATURE * 4 * 8  # r1: 8 channels x 2x2 cells
    assert _bins(path, ["r1"], enough)["r1"] == 2
    assert _bins(path, ["r1"], enough - 1)["r1"] == 1


def test_dense_head_keeps_its_grid_whatever_the_sample_count(tmp_path: Path) -> None:
    model, _ = flatten_gemm()  # an 8-channel 8x8 map flattened into a Gemm: the head reads all 64 positions
    probe = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    path = str(tmp_path / "head.onnx")
    onnx.save(model, path)
    assert _bins(path, [probe])[probe] == 8
    assert _bins(path, [probe], samples=10)[probe] == 8


def test_calibration_records_the_grid_the_sample_count_allows(tmp_path: Path) -> None:
    path = tiny_classifier(str(tmp_path / "m.onnx"), in_channels=3, widths=(8, 16), classes=10)
    rng = np.random.default_rng(0)

    def cells(n: int) -> int:
        x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
        y = np.arange(n) % 10
        data = from_iterable([({"input": x[i:i + 64]}, y[i:i + 64]) for i in range(0, n, 64)], name="synthetic")
        stats = calibrate(path, data, probes=["r1"], progress=False, intra_op_threads=1)
        return stats.probes["r1"].cells

    assert cells(320) == 4 and cells(200) == 1

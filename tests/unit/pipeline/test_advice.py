"""Calibration-size advice from the analysis alone (pipeline.prune.advice), counted by hand on the tiny classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.model.prepare import prepare
from pipeline.prune.advice import sample_advice
from pipeline.prune.demo import demo_model_path
from tests.graphs import tiny_classifier


@pytest.fixture()
def model(tmp_path: Path) -> str:
    # input 3ch 8x8 -> conv1 (8) -> relu r1 -> conv2 (16) -> relu r2 -> GAP -> Flatten -> Gemm (10)
    return tiny_classifier(str(tmp_path / "m.onnx"), in_channels=3, widths=(8, 16), classes=10)


def test_advice_counts_features_and_unknowns(model: str) -> None:
    advice = sample_advice(prepare(model), protected=())  # by default both groups are protected (the ends)
    # r1 is read by a 3x3 conv: 2x2 grid -> 8 * 4 = 32 features; the second group is probed after the GAP: 16
    assert (advice.widest_probe, advice.probe_features, advice.scoring_images) == ("r1", 32, 320)
    # conv2: 8 * 9 + 1 = 73 unknowns, 64 positions per image -> ceil(730 / 64) = 12 images;
    # fc: 16 + 1 = 17 unknowns, one row per image -> 170 images (the most demanding)
    assert (advice.hardest_layer, advice.layer_unknowns, advice.rows_per_image, advice.recovery_images) == (
        "fc", 17, 1, 170)
    gap = sample_advice(prepare(model), pooling="gap", protected=())
    assert (gap.widest_probe, gap.probe_features) == ("gap", 16)  # the pooled tensor the Gemm reads
    narrow = sample_advice(prepare(model), max_dim=50, protected=())  # conv2 is too wide for R3 now
    assert narrow.r2_layers == ("conv2",) and narrow.hardest_layer == "fc"


    ends = sample_advice(prepare(model))
    assert ends.widest_probe is None and ends.recovery_images == 0 and "no group can lose channels" in ends.summary()


def test_inspect_prints_the_advice(capsys: pytest.CaptureFixture[str]) -> None:
    model = str(demo_model_path())
    advice = sample_advice(prepare(model))
    assert advice.scoring_images > 0 and advice.recovery_images > 0
    assert main(["inspect", model]) == 0
    assert advice.summary() in capsys.readouterr().out
    assert main(["inspect", model, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration_advice"] == advice.to_dict()

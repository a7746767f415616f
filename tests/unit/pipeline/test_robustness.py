"""Robustness analysis: noise and transferred adversarial examples against a pruned model and its original."""

from __future__ import annotations

import importlib.util

import onnx
import pytest

from pipeline.data.named import open_dataset
from pipeline.evaluation.evaluate import evaluate
from pipeline.evaluation.robustness import robustness
from pipeline.prune.demo import demo_model_path
from pipeline.prune.orchestrate import PruneRun

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnx2torch") is None,
                                reason="the adversarial part needs the [torch] extra (onnx2torch is not installed)")


@pytest.fixture(scope="module")
def models() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    run = PruneRun(demo_model_path(), open_dataset("mnist", split="train", limit=400), progress=False)
    return run.prepared.model, run.candidate("l2", target_macs=0.5, recover="lstsq").model


def test_clean_scores_equal_evaluation_and_attacks_hurt_the_attacked_model(models) -> None:
    original, pruned = models
    data = open_dataset("mnist", split="test", limit=200)
    result = robustness(original, pruned, data, noise=(0.5,), epsilons=(0.3,), pgd_steps=3, intra_op_threads=1)
    clean = result["clean"]
    assert clean["top1_original"] == pytest.approx(evaluate(original, data, intra_op_threads=1).top1)
    assert clean["top1_pruned"] == pytest.approx(evaluate(pruned, data, intra_op_threads=1).top1)
    assert result["samples"] == 200 and result["input_std"] > 0
    fgsm, pgd = result["fgsm"]["0.3"], result["pgd"]["0.3"]
    assert fgsm["top1_original"] < clean["top1_original"] - 0.05  # crafted on the original: it must hurt it
    assert pgd["top1_original"] <= fgsm["top1_original"] + 0.02  # more steps are at least as strong (up to noise)
    assert 0.0 <= result["noise"]["0.5"]["agreement"] <= 1.0


def test_noise_is_seeded(models) -> None:
    original, pruned = models
    data = open_dataset("mnist", split="test", limit=100)
    runs = [robustness(original, pruned, data, noise=(1.0,), epsilons=(), seed=3, intra_op_threads=1)
            for _ in range(2)]
    assert runs[0]["noise"] == runs[1]["noise"]

"""Grow-Push-Prune's push: the loss terms on planted features, the pushed graph, push -> prune end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from graph_ops.io import sha256_file
from pipeline.cli import main
from pipeline.errors import UserInputError
from pipeline.prune.demo import demo_model_path
from pipeline.training.push import PushOptions, push_terms

torch = pytest.importorskip("torch")
needs_onnx2torch = pytest.mark.skipif(importlib.util.find_spec("onnx2torch") is None,
                                      reason="needs the [torch] extra (onnx2torch is not installed)")


def _planted(channels: int, informative: int, correlated: bool = False, n: int = 400) -> dict[str, float]:
    """Terms of features whose first ``informative`` channels carry the class (two classes), the rest noise."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    noise = rng.standard_normal((n, channels))
    if correlated:
        noise[:, 1:] = noise[:, :1] + 0.05 * noise[:, 1:]  # within-class: every channel follows channel 0
    feats = noise + 3.0 * labels[:, None] * (np.arange(channels) < informative)
    terms = push_terms(torch, torch.from_numpy(feats), torch.from_numpy(labels))
    return {k: float(v) for k, v in terms.items()}


def test_separation_term_falls_as_more_variance_separates_the_classes() -> None:
    assert _planted(8, 8)["sep"] < _planted(8, 1)["sep"] < 0.9


def test_alignment_term_is_low_when_one_channel_holds_the_separation() -> None:
    one, spread = _planted(8, 1), _planted(8, 8)
    assert one["align"] < 0.2 and spread["align"] > 0.95


def test_covariance_term_sees_within_class_correlation() -> None:
    assert _planted(8, 1)["cov"] < 0.01 and _planted(8, 1, correlated=True)["cov"] > 0.9


def test_options_refuse_nonsense() -> None:
    with pytest.raises(UserInputError):
        PushOptions(batch_size=1)
    with pytest.raises(UserInputError):
        PushOptions(align_weight=-1.0)


@needs_onnx2torch
def test_cli_push_then_prune_writes_the_pushed_model_and_a_plan_for_it(tmp_path: Path) -> None:
    out = tmp_path / "pruned.onnx"
    code = main(["-q", "push", str(demo_model_path()), "--data", "mnist", "--limit", "192", "--epochs", "1",
                 "--target-macs", "0.5", "--recover", "none", "-o", str(out)])
    assert code == 0
    pushed = tmp_path / "pruned.pushed.onnx"
    record = json.loads(Path(f"{pushed}.push.json").read_text())
    assert record["format"] == "diprune.push/1" and record["round_trip_error"] <= 1e-5
    assert set(record["terms_before"]) == {"sep", "cov", "align"} and record["probes"]
    original, pushed_model = onnx.load(str(demo_model_path())), onnx.load(str(pushed))
    assert [n.op_type for n in pushed_model.graph.node] == [n.op_type for n in original.graph.node
                                                            if n.op_type not in ("BatchNormalization", "Identity")]
    plan = json.loads(Path(f"{out}.plan.json").read_text())
    assert plan["model_sha256"] == sha256_file(pushed)  # the plan re-applies to the pushed file
    applied = tmp_path / "again.onnx"
    assert main(["-q", "apply", str(pushed), f"{out}.plan.json", "-o", str(applied)]) == 0
    assert onnx.load(str(applied)).SerializeToString() == onnx.load(str(out)).SerializeToString()

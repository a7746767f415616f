"""The spine of a run: one analysis, shape inference at most twice, every stage on the one prepared model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import graph_ops.channel_state
from graph_ops.canonicalize import canonicalize
from graph_ops.channels import analyze
from graph_ops.errors import PlanValidationError
from graph_ops.mask import zero_channels
from graph_ops.proto import fingerprint
from graph_ops.prune import apply_plan
from pipeline.data.named import open_dataset
from pipeline.prune.demo import demo_model_path
from pipeline.prune.one_shot import prune
from pipeline.prune.orchestrate import PruneRun
from tests.graphs import concat, residual
from tests.oracles import random_valid_plan


class _Counter:
    def __init__(self) -> None:
        self.calls = 0

    def wrap(self, func):
        def counted(*args, **kwargs):
            self.calls += 1
            return func(*args, **kwargs)

        return counted


@pytest.mark.parametrize("recover", ["lstsq", "regress"])
def test_one_prune_run_analyses_once_and_infers_shapes_at_most_twice(tmp_path: Path, monkeypatch, recover: str) -> None:
    inference, analyses = _Counter(), _Counter()
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", inference.wrap(onnx.shape_inference.infer_shapes))
    monkeypatch.setattr(graph_ops.channel_state.Analysis, "__init__",
                        analyses.wrap(graph_ops.channel_state.Analysis.__init__))
    report = prune(demo_model_path(), tmp_path / "out.onnx", data=open_dataset("mnist", split="train", limit=160),
                   method="di", target_macs=0.5, recover=recover, progress=False,
                   eval_data=open_dataset("mnist", split="test", limit=100))
    assert report.recovery["method"] == recover and report.evaluation["pruned"]["top1"] is not None
    assert analyses.calls == 1
    assert inference.calls <= 2, inference.calls


def test_a_run_calibrates_once_for_every_statistics_method_and_budget(monkeypatch) -> None:
    import pipeline.prune.orchestrate

    calibrations = _Counter()
    monkeypatch.setattr(pipeline.prune.orchestrate, "calibrate", calibrations.wrap(pipeline.prune.orchestrate.calibrate))
    run = PruneRun(demo_model_path(), open_dataset("mnist", split="train", limit=120), progress=False)
    for method in ("mean-act", "di", "lda", "l2"):
        for target in (0.5, 0.3):
            candidate = run.candidate(method, target_macs=target, recover="none")
            assert candidate.plan.meta["macs_fraction"] <= target
    assert calibrations.calls == 1


@pytest.mark.parametrize("motif", [residual, concat], ids=["residual", "concat"])
def test_surgery_and_the_mask_refuse_the_analysis_of_another_graph(motif) -> None:
    model = canonicalize(motif()[0])
    index = analyze(model)
    keep = random_valid_plan(index, np.random.default_rng(0))
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.node[1].name = "renamed"
    for rewrite in (apply_plan, zero_channels):
        rewrite(model, index, keep)
        with pytest.raises(PlanValidationError, match="does not belong to this model"):
            rewrite(other, index, keep)


def test_the_fingerprint_ignores_weight_values_but_not_structure() -> None:
    model = canonicalize(residual()[0])
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    weight = next(t for t in changed.graph.initializer if len(t.dims) == 4)
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 2, weight.name))
    assert fingerprint(changed) == fingerprint(model)
    changed.graph.node[0].attribute.append(onnx.helper.make_attribute("dilations", [1, 1]))
    assert fingerprint(changed) != fingerprint(model)


def test_pruned_shapes_come_from_the_analysis_and_pass_the_strict_checker() -> None:
    """apply_plan declares the pruned shapes without running inference; the full checker (strict inference)
    accepts them, and they equal what inference finds."""
    from graph_ops.proto import declared_shapes, static_shapes

    model = canonicalize(concat()[0])
    index = analyze(model)
    pruned = apply_plan(model, index, random_valid_plan(index, np.random.default_rng(5)))
    onnx.checker.check_model(pruned, full_check=True)
    declared, inferred = declared_shapes(pruned), static_shapes(pruned)
    assert {k: v for k, v in declared.items() if k in inferred} == {k: inferred[k] for k in declared if k in inferred}


def test_a_run_refuses_a_work_folder_that_does_not_exist(tmp_path: Path) -> None:
    from graph_ops.errors import UserInputError

    missing = tmp_path / "nowhere"
    with pytest.raises(UserInputError, match=r"does not exist.*create it"):
        PruneRun(demo_model_path(), None, progress=False, work_dir=missing)
    assert not missing.exists()
    run = PruneRun(demo_model_path(), None, progress=False, work_dir=tmp_path)
    assert run.work_dir == str(tmp_path)

"""Production architectures (timm backbones, Ultralytics detectors built from YAML), both exporters where they work.

Random weights with randomised BatchNorm statistics (``tests.production_models``); the packages are optional test
extras: without them every test here skips and says which package is missing. For each model:

* analysis: every frozen group has a reason, at least 90 % of the Conv output channels are prunable
  (:data:`MIN_SHARE`), and every Conv/Gemm MACs is known (static shapes);
* exact surgery: three seeded random plans (25-90 % kept per group, the same count in every block of a group read
  or written by a grouped conv) give the outputs of the mask oracle, pass the full checker, and the counted MACs and
  params equal the cost model's prediction;
* a budget: ``l2`` scores planned to 0.5 of the MACs meet the budget contract (``tests.budget_checks``) and the plan
  applied equals its mask.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from graph_ops.channels import analyze, prunable_share
from graph_ops.io import load_model
from graph_ops.mask import zero_channels
from graph_ops.prune import apply_plan
from pipeline.prune.orchestrate import keep_lists, prepare, score
from pipeline.selection.allocate import select_channels
from tests.budget_checks import check_budget
from tests.oracles import assert_same_outputs, check_exact_surgery, check_lstsq_mask_reference, random_feeds
from tests.production_models import EXPORTERS, PRODUCTION

pytestmark = pytest.mark.zoo

MIN_SHARE = 0.9
GROUPED = {"regnety_002", "resnext50_32x4d"}  # grouped convolutions: groups in equal blocks


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", PRODUCTION)
def test_production_pruned_equals_masked(name: str, exporter: str, production_model: Callable[[str, str], Path],
                                         record_property: Callable[[str, object], None]) -> None:
    model = load_model(production_model(name, exporter))
    index = analyze(model)
    reasons = [g.frozen for g in index.groups if g.frozen]
    assert all(r.strip() for r in reasons)
    share = prunable_share(model, index)
    record_property("prunable_share", round(share, 4))
    assert share >= MIN_SHARE, reasons
    assert not index.unknown_macs
    assert any(g.blocks > 1 for g in index.groups) == (name in GROUPED)
    _, equal = check_exact_surgery(model, index, random_feeds(model, np.random.default_rng(0), batch=1))
    assert equal  # predicted MACs and params == counted


@pytest.mark.parametrize("name", PRODUCTION)
def test_production_budget(name: str, production_model: Callable[[str, str], Path]) -> None:
    prepared = prepare(production_model(name, "legacy"))
    plan = select_channels(score(prepared, None, "l2"), prepared.index, target_macs=0.5, round_to=8)
    keep = keep_lists(plan)
    pruned = apply_plan(prepared.model, prepared.index, keep)
    check_budget(plan, prepared.index, prepared.model, pruned, 0.5, counter=prepared.count)
    feeds = random_feeds(prepared.model, np.random.default_rng(0), batch=1)
    assert_same_outputs(zero_channels(prepared.model, prepared.index, keep), pruned, feeds, rtol=1e-4)


@pytest.mark.parametrize("name", ["regnety_002", "mixnet_m", "ghostnetv2_100", "yolo11n"])
def test_production_lstsq_recovery_equals_its_mask_reference(name: str,
                                                             production_model: Callable[[str, str], Path]) -> None:
    """R3 on refined groups, grouped convs (per conv group) and a detector, against the recovered mask reference
    (``tests.oracles.recovered_reference``); unlabelled data (recovery never reads labels)."""
    model = load_model(production_model(name, "legacy"))
    check_lstsq_mask_reference(model, analyze(model))


@pytest.mark.parametrize("name", ["lcnet_050", "ese_vovnet19b_dw", "mobilevit_xxs"])
def test_architectures_that_once_broke_the_default_prune(name: str,
                                                        production_model: Callable[[str, str], Path]) -> None:
    """Found by ``benchmarks.architectures`` (timm models outside the zoo): DI scoring stopped on near-constant
    channels (lcnet_050, ese_vovnet19b_dw: a scatter indefinite by rounding) and lstsq recovery on a transformer's
    3-D MatMul (mobilevit_xxs). The default job runs through, every refit layer written in the surgery's layout."""
    import onnx

    from pipeline.data.datasets import from_iterable
    from pipeline.prune.orchestrate import PruneRun
    from tests.oracles import recovered_reference
    from tests.production_models import input_shape

    path = production_model(name, "legacy")
    x = np.random.default_rng(0).standard_normal((96, *input_shape(name)[1:])).astype(np.float32)
    data = from_iterable([(x[i:i + 32], np.arange(i, i + 32) % 10) for i in range(0, 96, 32)], name="gaussian")
    run = PruneRun(path, data, batch_size=32, backend="ort-cpu", progress=False)
    plan = run.plan(run.scores("di"), target_macs=0.6)
    assert plan.meta["reached"]
    keep = keep_lists(plan)
    recovered, report = run.recover(run.apply(plan), plan, "lstsq")
    onnx.checker.check_model(recovered, full_check=True)
    layers = report["consumers"]
    assert len(layers) >= 10
    refit = {c["node"] for c in layers if c.get("alpha") is not None}
    model, index = run.prepared.model, run.prepared.index
    assert_same_outputs(recovered_reference(model, recovered, index, keep, refit), recovered, {
        model.graph.input[0].name: x[:2]}, rtol=1e-4, atol=1e-5)


def test_vit_mlp_hidden_features_are_pruned_exactly(tmp_path: Path) -> None:
    """A timm ViT (vit_tiny at 64 x 64, legacy exporter): the hidden features of every block's MLP (768, last axis of
    [N, 17, 768] tokens) are prunable groups; random plans equal the mask oracle with predicted == counted MACs, and
    the default job (DI, lstsq) runs, its refit layers in the surgery's layout."""
    import onnx

    from pipeline.data.datasets import from_iterable
    from pipeline.model.export import export_torch
    from pipeline.prune.orchestrate import PruneRun
    from tests.oracles import recovered_reference
    from tests.production_models import build, missing

    if missing("vit_tiny_patch16_224"):
        pytest.skip(missing("vit_tiny_patch16_224"))
    import torch

    path = export_torch(build("vit_tiny_patch16_224"), torch.randn(1, 3, 64, 64), tmp_path / "vit.onnx",
                        dynamo=False, check=True)
    model = load_model(path)
    index = analyze(model)
    assert sorted(g.size for g in index.groups if g.prunable) == [768] * 12
    _, equal = check_exact_surgery(model, index, random_feeds(model, np.random.default_rng(0), batch=2))
    assert equal
    x = np.random.default_rng(0).standard_normal((64, 3, 64, 64)).astype(np.float32)
    data = from_iterable([(x[i:i + 32], np.arange(i, i + 32) % 10) for i in range(0, 64, 32)], name="gaussian")
    run = PruneRun(path, data, batch_size=32, backend="ort-cpu", progress=False)
    plan = run.plan(run.scores("di"), target_macs=0.7)
    recovered, report = run.recover(run.apply(plan), plan, "lstsq")
    onnx.checker.check_model(recovered, full_check=True)
    refit = {c["node"] for c in report["consumers"] if c.get("alpha") is not None}
    assert len(refit) >= 12
    assert_same_outputs(recovered_reference(run.prepared.model, recovered, run.prepared.index, keep_lists(plan),
                                            refit), recovered, {model.graph.input[0].name: x[:2]}, rtol=1e-4,
                        atol=1e-5)

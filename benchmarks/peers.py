"""Peer pruning tools behind one adapter shape, for the quality benchmark (``benchmarks/quality.py``).

Every entry of :data:`PEERS` is ``factory(family, original_onnx, calib_dataset) -> prune_at(sparsity) -> ModelProto``:
the benchmark bisects on the peer's own sparsity knob to match an achieved kept-MACs fraction.

* ``onnxsim-l2``: onnxsim 0.8.1 ``apply_structured_pruning`` (per-chain L2 filter norm, local sparsity), on the same
  ONNX file DIPrune gets.
* ``onnxsim-wanda``: onnxsim 0.8.1 ``apply_structured_wanda_pruning`` (``||W_row||_2 * ||X||_2``) calibrated on the
  first 512 training samples (8 batches of 64).
* ``onnxsim-l2+bn``: ``onnxsim-l2`` then onnxsim's own training-free recovery ``recover_batch_norm`` (identity
  BatchNorm inserted after every Conv, fitted in closed form on the calibration batches, with the original model as
  the target distribution); the bisection runs on the L2 part, recovery only on the matched point.
* ``torch-pruning`` / ``torch-pruning-global``: Torch-Pruning 1.6.1 ``BasePruner`` with
  ``MagnitudeImportance(p=2)``, per-layer uniform ratio / global ranking, final Linear ignored, no fine-tuning, on
  BN-free torch twins of the ONNX models (below), exported with the legacy exporter (opset 17) and evaluated with
  onnxruntime like everything else.

Torch models. The ONNX files have BatchNorm folded into the convolutions, and the torch weights were never kept.
:func:`torch_twin` builds the family's module from ``benchmarks/mnist_models.py``, replaces every BatchNorm2d by
Identity, and loads the folded ONNX Conv (weight, bias) and Gemm (weight, bias) initialisers into the torch Conv2d /
Linear modules in execution order (matched by the legacy exporter's node names, e.g.
``/2/body/body.0/body.0.0/Conv`` -> module ``2.body.0.0``), checking every shape;
:func:`twin_max_error` measures the twin against the ONNX model (it must agree to float tolerance). Magnitude
importance on these folded weights is the same quantity the onnxsim L2 peer and DIPrune's ``l2`` see.
"""

from __future__ import annotations

import copy
import io
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

PruneAt = Callable[[float], onnx.ModelProto]
WANDA_BATCHES = 8
WANDA_BATCH = 64


def calib_batches(calib: Any, n_batches: int = WANDA_BATCHES, size: int = WANDA_BATCH) -> list[dict[str, np.ndarray]]:
    """The first ``n_batches`` batches of the calibration set as ``{"input": array}`` feeds."""
    out = []
    for feeds, _ in calib.batches(size):
        out.append({"input": np.ascontiguousarray(next(iter(feeds.values())), dtype=np.float32)})
        if len(out) == n_batches:
            break
    return out


def onnxsim_l2(family: str, original: onnx.ModelProto, calib: Any) -> PruneAt:
    """onnxsim ``apply_structured_pruning`` (L2) at a sparsity."""
    import onnxsim

    return lambda sparsity: onnxsim.apply_structured_pruning(original, sparsity=sparsity)


def onnxsim_wanda(family: str, original: onnx.ModelProto, calib: Any) -> PruneAt:
    """onnxsim ``apply_structured_wanda_pruning`` calibrated on real training batches."""
    import onnxsim

    batches = calib_batches(calib)
    return lambda sparsity: onnxsim.apply_structured_wanda_pruning(original, calibration_data=batches,
                                                                   sparsity=sparsity)


def onnxsim_bn_recover(model: onnx.ModelProto, original: onnx.ModelProto, calib: Any) -> onnx.ModelProto:
    """onnxsim's own training-free recovery: BatchNorm re-inserted and fitted to the original's statistics."""
    import onnxsim.bn_recovery as bnr

    return bnr.recover_batch_norm(model, calibration_data=calib_batches(calib), target_model=original)


def _import_torchvision_safe() -> None:
    """CPU torch: stub the torchvision meta registrations before anything imports torchvision."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


def _strip_bn(model: Any) -> None:
    """Replace every BatchNorm2d by Identity (its affine map is folded into the ONNX conv weights)."""
    import torch.nn as nn

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, nn.Identity())


def module_path(node_name: str) -> str:
    """Torch module path of a legacy-exported node name: ``/2/body/body.0/body.0.0/Conv`` -> ``2.body.0.0``."""
    scopes = node_name.split("/")[1:-1]
    if len(scopes) == 1 or scopes[-1].startswith(scopes[0] + "."):
        return scopes[-1]
    return f"{scopes[0]}.{scopes[-1]}"


def torch_twin(family: str, original: onnx.ModelProto) -> Any:
    """BN-free torch module of ``family`` carrying the (BN-folded) weights of the ONNX model.

    Raises:
        ValueError: the ONNX parameter list does not map one-to-one onto the torch modules.
    """
    import torch
    import torch.nn as nn

    from benchmarks.mnist_models import build

    model = build(family).eval()
    _strip_bn(model)
    init = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    nodes = [n for n in original.graph.node if n.op_type in ("Conv", "Gemm")]
    named = dict(model.named_modules())
    mods = [named.get(module_path(n.name)) for n in nodes]
    counted = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in named.values())
    if any(m is None for m in mods) or len(set(map(id, mods))) != counted:
        raise ValueError(f"{family}: ONNX Conv/Gemm node names do not map one-to-one onto the torch modules")
    for node, mod in zip(nodes, mods, strict=True):
        weight = init[node.input[1]]
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
            weight = weight.T
        if tuple(weight.shape) != tuple(mod.weight.shape):
            raise ValueError(f"{family}: {node.name} weight {weight.shape} vs torch {tuple(mod.weight.shape)}")
        bias = init[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(weight.shape[0], np.float32)
        mod.weight = nn.Parameter(torch.from_numpy(np.array(weight, np.float32)))
        mod.bias = nn.Parameter(torch.from_numpy(np.array(bias, np.float32)))
    return model


def export_legacy(model: Any) -> onnx.ModelProto:
    """Legacy (TorchScript) export, opset 17, dynamic batch, into memory."""
    import torch

    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return onnx.load_from_string(buf.getvalue())


def twin_max_error(family: str, original: onnx.ModelProto, x: np.ndarray) -> float:
    """Max |logit difference| between the torch twin and the ONNX model on ``x``."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(original.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ref = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        got = torch_twin(family, original)(torch.from_numpy(x)).numpy()
    return float(np.abs(got - ref).max())


def _torch_pruning(global_pruning: bool) -> Callable[[str, onnx.ModelProto, Any], PruneAt]:
    def factory(family: str, original: onnx.ModelProto, calib: Any) -> PruneAt:
        _import_torchvision_safe()
        import torch
        import torch.nn as nn
        import torch_pruning as tp

        base = torch_twin(family, original)

        def prune_at(ratio: float) -> onnx.ModelProto:
            model = copy.deepcopy(base)
            ignored = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
            pruner = tp.pruner.BasePruner(model, torch.zeros(1, 1, 28, 28),
                                          importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                                          global_pruning=global_pruning, ignored_layers=ignored)
            pruner.step()
            return export_legacy(model.eval())

        return prune_at

    return factory


PEERS: dict[str, Callable[[str, onnx.ModelProto, Any], PruneAt]] = {
    "onnxsim-l2": onnxsim_l2,
    "onnxsim-wanda": onnxsim_wanda,
    "torch-pruning": _torch_pruning(False),
    "torch-pruning-global": _torch_pruning(True),
}

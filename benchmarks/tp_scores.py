"""Torch-Pruning's criteria as DIPrune channel scores, for the dense tasks of ``benchmarks/dense_tasks.py``.

The ONNX models have BatchNorm folded into their convolutions. :func:`torch_twin` builds the task's torch module,
replaces every BatchNorm2d by Identity and loads the ONNX Conv / ConvTranspose weights and biases into the torch
modules, matched by the legacy exporter's node names (``/body/body.0/body.0.0/Conv`` -> module ``body.0.0``, see
:func:`benchmarks.peers.module_path`), checking every shape: the twin computes the ONNX model's function (checked
by :func:`twin_max_error`).

:func:`taylor_scores` runs Torch-Pruning 1.6.1's ``DependencyGraph`` on the twin, accumulates the gradients of the
task's training loss (:func:`benchmarks.dense_tasks.loss_fn`) over the calibration samples with their ground-truth
labels, and scores every pruning group rooted at a Conv / ConvTranspose with ``GroupTaylorImportance()``
(|w * dL/dw| per channel, summed over each coupled parameter, mean over the group, normalised by the mean). A DIPrune
channel group takes the importances of the Torch-Pruning group whose root is its producer's module (the mean over
producers when it has several); the planner then allocates as it does for every other method.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from benchmarks.peers import _import_torchvision_safe, _strip_bn, module_path
from pipeline.model.prepare import PreparedModel
from pipeline.selection.scorers.base import ChannelScores

SOURCES = ("Conv", "ConvTranspose")


def torch_twin(task: str, model: onnx.ModelProto) -> Any:
    """BN-free torch module of ``task`` carrying the ONNX model's (BN-folded) weights.

    Raises:
        ValueError: a Conv node does not map onto a torch module of the same shape, or a module is left over.
    """
    import torch
    import torch.nn as nn

    from benchmarks.dense_tasks import build

    twin = build(task).eval()
    _strip_bn(twin)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    named = dict(twin.named_modules())
    seen = set()
    for node in (n for n in model.graph.node if n.op_type in SOURCES):
        mod = named.get(module_path(node.name))
        weight = init[node.input[1]]
        if mod is None or tuple(mod.weight.shape) != weight.shape:
            raise ValueError(f"{task}: ONNX node {node.name} {weight.shape} has no torch module of that shape")
        out_axis = 1 if node.op_type == "ConvTranspose" else 0
        bias = init[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(weight.shape[out_axis])
        mod.weight = nn.Parameter(torch.from_numpy(np.array(weight, np.float32)))
        mod.bias = nn.Parameter(torch.from_numpy(np.array(bias, np.float32)))
        seen.add(id(mod))
    convs = [m for m in named.values() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    if len(seen) != len(convs):
        raise ValueError(f"{task}: {len(convs) - len(seen)} torch conv modules have no ONNX node")
    return twin


def twin_max_error(task: str, model: onnx.ModelProto, x: np.ndarray) -> float:
    """Max |output difference| between the twin and the ONNX model on ``x`` (float32 model input)."""
    import torch

    from benchmarks.dense_tasks import run_onnx

    with torch.no_grad():
        got = torch_twin(task, model)(torch.from_numpy(x)).numpy()
    return float(np.abs(got - run_onnx(model, x)).max())


def taylor_scores(task: str, prepared: PreparedModel, x: np.ndarray, labels: Any, batch: int = 64) -> ChannelScores:
    """Torch-Pruning ``GroupTaylorImportance`` of every prunable group (see the module docstring).

    Args:
        task: the dense task (``seq``, ``det``, ``seg``).
        prepared: the prepared (canonical) ONNX model.
        x: calibration inputs, float32 as the model takes them.
        labels: their ground-truth labels (sequences, per-image boxes or class maps).
        batch: samples per backward pass (the gradients are summed).

    Raises:
        ValueError: a prunable group has no Torch-Pruning group.
    """
    _import_torchvision_safe()
    import torch
    import torch.nn as nn
    import torch_pruning as tp

    from benchmarks.dense_tasks import _batch, loss_fn, train_targets

    torch.manual_seed(0)
    twin = torch_twin(task, prepared.model)
    names = {id(m): name for name, m in twin.named_modules()}
    inputs = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    graph = tp.DependencyGraph().build_dependency(twin, example_inputs=inputs[:1])
    target = train_targets(task, labels)
    twin.zero_grad()
    for start in range(0, len(x), batch):
        idx = np.arange(start, min(start + batch, len(x)))
        (loss_fn(task, twin, inputs[idx], _batch(target, idx)) * len(idx) / len(x)).backward()
    importance = tp.importance.GroupTaylorImportance()
    by_module: dict[str, np.ndarray] = {}
    for group in graph.get_all_groups(root_module_types=[nn.Conv2d, nn.ConvTranspose2d]):
        root = group[0].dep.target.module
        by_module[names[id(root)]] = importance(group).detach().numpy().astype(np.float64)
    scores = {}
    for g in prepared.index.groups:
        if not g.prunable:
            continue
        found = [by_module[p] for p in (module_path(n) for n in g.producers) if p in by_module]
        if not found or any(len(f) != g.size for f in found):
            raise ValueError(f"{task}: group {g.id} ({g.size} channels) has no Torch-Pruning group of that size")
        scores[g.id] = np.mean(found, axis=0)
    return ChannelScores("tp-taylor", {}, scores, model_sha256=prepared.sha256)

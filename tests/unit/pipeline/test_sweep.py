"""Recovery's sweep: level by level, each node run once, the tensors equal those of whole-model runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graph_ops.canonicalize import canonicalize
from graph_ops.channels import analyze
from graph_ops.probes import expose_tensors
from graph_ops.proto import layer_weights, write_weights
from graph_ops.prune import apply_plan
from pipeline.data.datasets import from_iterable
from pipeline.recovery.sweep import Sweep, layer_levels, node_steps
from tests.graphs import concat, flatten_gemm, residual
from tests.oracles import random_valid_plan, run_ort

MOTIFS = {"residual": residual, "concat": concat, "flatten-gemm": flatten_gemm}


def _setup(motif):
    model = canonicalize(motif()[0])
    index = analyze(model)
    pruned = apply_plan(model, index, random_valid_plan(index, np.random.default_rng(1), 0.4, 0.8))
    layers = [i for i, n in enumerate(model.graph.node) if n.op_type in ("Conv", "Gemm", "MatMul")]
    levels = dict(zip(layers, layer_levels(model, layers), strict=True))
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(2).standard_normal((7, 1, *shape[1:])).astype(np.float32)
    return model, pruned, levels, x


def _values(model: onnx.ModelProto, names: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
    """The named tensors of a whole-model run."""
    exposed = expose_tensors(model, names)
    got = dict(zip([o.name for o in exposed.graph.output], run_ort(exposed, {"x": x}), strict=True))
    return [got[name] for name in names]


@pytest.mark.parametrize("spill_bytes", [1 << 30, 0], ids=["in-memory", "spilled"])
@pytest.mark.parametrize("motif", MOTIFS.values(), ids=MOTIFS.keys())
def test_level_tensors_equal_whole_model_runs_while_the_current_model_changes(motif, spill_bytes: int) -> None:
    """At every level the sweep yields, per batch, the original's layer outputs and the current model's layer
    inputs exactly as whole-model runs compute them, although the current model's layers of earlier levels were
    rewritten in between (what a refit does)."""
    model, pruned, levels, x = _setup(motif)
    graph = model.graph.node
    requests = {k: (tuple(graph[i].output[0] for i in levels if levels[i] == k),
                    tuple(graph[i].input[0] for i in levels if levels[i] == k)) for k in sorted(set(levels.values()))}
    data = from_iterable([(item, None) for item in x])
    sweep = Sweep(model, pruned, levels, requests, data, sequential=True, batch_size=1, intra_op_threads=1,
                  spill_bytes=spill_bytes)
    try:
        for level in sorted(requests):
            names_o, names_c = requests[level]
            for batch, (held, outs, curs) in enumerate(sweep.level(level)):
                want_o, want_c = _values(model, names_o, x[batch]), _values(pruned, names_c, x[batch])
                for got, want in zip([*outs, *curs], [*want_o, *want_c], strict=True):
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
                assert held == (batch % 5 == 4)
            for idx in [i for i in levels if levels[i] == level]:  # "refit" this level's layers
                weight, bias = layer_weights(pruned, pruned.graph.node[idx])
                write_weights(pruned, idx, weight * 1.5, None if bias is None else bias - 0.25)
    finally:
        sweep.close()


@pytest.mark.parametrize("motif", MOTIFS.values(), ids=MOTIFS.keys())
def test_every_needed_node_runs_in_exactly_one_step(motif) -> None:
    model, pruned, levels, _ = _setup(motif)
    for steps in (node_steps(model, levels, after=False), node_steps(pruned, levels, after=True)):
        assert len(steps) == len(model.graph.node)
        assert all(0 <= s <= max(levels.values()) + 1 for s in steps)
    current = node_steps(pruned, levels, after=True)
    original = node_steps(model, levels, after=False)
    for idx, level in levels.items():  # a layer runs after its level's refit in the pruned model, at it otherwise
        assert (current[idx], original[idx]) == (level + 1, level)


def test_one_pass_runs_the_models_once_and_spills_nothing_it_does_not_need(tmp_path) -> None:
    model, pruned, levels, x = _setup(residual)
    flat = dict.fromkeys(levels, 0)
    names = tuple(model.graph.node[i].output[0] for i in levels)
    data = from_iterable([(item, None) for item in x])
    sweep = Sweep(model, pruned, flat, {0: (names, names)}, data, sequential=False, batch_size=1,
                  intra_op_threads=1, spill_dir=tmp_path, spill_bytes=0)
    batches = list(sweep.level(0))
    sweep.close()
    assert len(batches) == len(x)
    assert list(tmp_path.iterdir()) == []  # nothing outlives the single step, and close() removes the folder
    want = _values(pruned, names, x[3])
    for got, ref in zip(batches[3][2], want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_a_model_with_other_nodes_is_refused() -> None:
    model, pruned, levels, x = _setup(residual)
    del pruned.graph.node[-1]
    with pytest.raises(Exception, match="nodes differ"):
        Sweep(model, pruned, levels, {0: (("x",), ("x",))}, from_iterable([(x[0], None)]), sequential=True)
    assert isinstance(onnx.ModelProto(), onnx.ModelProto)

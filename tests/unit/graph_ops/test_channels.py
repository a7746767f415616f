"""Channel-group analysis on motif graphs: groups, sizes, freeze reasons, layouts, probes, cost model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graph_ops.channel_rules import CHANNEL_RULES
from graph_ops.channels import analyze
from graph_ops.cost import count
from graph_ops.groups import Segment
from graph_ops.mask import zero_channels
from graph_ops.prune import apply_plan, kept_indices
from tests.graphs import Net
from tests.graphs_refine import ALL_MOTIFS as MOTIFS
from tests.oracles import assert_same_outputs, random_feeds, run_ort

MOTIF_IDS = sorted(MOTIFS)


@pytest.mark.parametrize("motif", MOTIF_IDS)
def test_groups_match_expectation(motif: str) -> None:
    model, expected = MOTIFS[motif]()
    index = analyze(model)
    assert len(index.groups) == expected.groups
    assert tuple(sorted(g.size for g in index.groups if g.prunable)) == expected.prunable_sizes
    reasons = [g.frozen for g in index.groups if g.frozen]
    if expected.reason:
        assert any(expected.reason in r for r in reasons), reasons


@pytest.mark.parametrize("motif", MOTIF_IDS)
def test_index_is_consistent(motif: str) -> None:
    model, _ = MOTIFS[motif]()
    index = analyze(model)
    ids = [g.id for g in index.groups]
    assert len(set(ids)) == len(ids)
    assert analyze(model).to_json() == index.to_json()  # deterministic
    for group in index.groups:
        assert group.frozen is None or group.frozen.strip()
        if group.prunable:
            assert group.producers and group.consumers and group.probes
            assert all(p in index.by_tensor for p in group.probes)
    for segments in index.by_tensor.values():
        assert [s.offset for s in segments] == list(np.cumsum([0] + [s.length for s in segments])[:-1])


@pytest.mark.parametrize("motif", MOTIF_IDS)
def test_unpruned_prediction_equals_counter(motif: str) -> None:
    model, _ = MOTIFS[motif]()
    macs, params = analyze(model).predict()
    report = count(model)
    assert macs == report.macs
    assert params == report.params


def test_concat_layout_has_offsets() -> None:
    model, _ = MOTIFS["concat"]()
    index = analyze(model)
    cat = next(n.output[0] for n in model.graph.node if n.op_type == "Concat")
    segments = index.by_tensor[cat]
    assert [(s.offset, s.length) for s in segments] == [(0, 4), (4, 6), (10, 8)]
    assert len({s.group_id for s in segments}) == 3
    stem = index.group(segments[2].group_id)
    assert stem.probes[-1] == cat and len(stem.probes) == 2  # the stem output (read by 2 convs) and the Concat
    assert len(stem.consumers) == 3


def test_residual_is_one_group_with_two_producers() -> None:
    model, _ = MOTIFS["residual"]()
    index = analyze(model)
    eight = [g for g in index.groups if g.prunable and g.size == 8]
    assert len(eight) == 1 and len(eight[0].producers) == 2
    assert eight[0].id == model.graph.node[0].output[0]  # first producer's output in topological order


def test_flatten_head_probe_is_the_4d_tensor() -> None:
    model, _ = MOTIFS["flatten_gemm"]()
    index = analyze(model)
    group = next(g for g in index.groups if g.prunable and g.size == 8)
    flatten = next(n for n in model.graph.node if n.op_type == "Flatten")
    assert group.probes == (flatten.input[0],)


def test_kept_indices_expands_blocks_and_offsets() -> None:
    segments = (Segment("a", 0, 0, 2), Segment("b", 2, 0, 3))
    keep = {"b": np.array([0, 2])}
    assert kept_indices(segments, keep).tolist() == [0, 1, 2, 4]
    assert kept_indices(segments, keep, block=2).tolist() == [0, 1, 2, 3, 4, 5, 8, 9]


def _with_extra_reader(model: onnx.ModelProto, conv_index: int, pos: int) -> onnx.ModelProto:
    """A copy where a Relu node also reads input ``pos`` of the ``conv_index``-th Conv."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    conv = [n for n in out.graph.node if n.op_type == "Conv"][conv_index]
    out.graph.node.append(onnx.helper.make_node("Relu", [conv.input[pos]], ["extra_out"], name="extra_reader"))
    out.graph.output.append(onnx.helper.make_tensor_value_info("extra_out", onnx.TensorProto.FLOAT, None))
    return out


def test_shared_exit_weight_freezes_group() -> None:
    model, _ = MOTIFS["conv_bn_relu"]()
    shared = _with_extra_reader(model, 1, 1)
    index = analyze(shared)
    first = index.group(model.graph.node[0].output[0])
    assert first.frozen and "shared by several nodes" in first.frozen
    second = next(g for g in index.groups if g.size == 12)
    assert second.prunable  # the same weight's producer side may be sliced: surgery copies it per reader
    pruned = apply_plan(shared, index, {second.id: [0, 5, 7]})
    feeds = random_feeds(shared, np.random.default_rng(0))
    assert_same_outputs(zero_channels(shared, index, {second.id: [0, 5, 7]}), pruned, feeds)


def test_shared_bias_stays_prunable() -> None:
    model, _ = MOTIFS["conv_bn_relu"]()
    shared = _with_extra_reader(model, 0, 2)
    index = analyze(shared)
    group = index.group(model.graph.node[0].output[0])
    assert group.prunable
    pruned = apply_plan(shared, index, {group.id: [1, 2]})
    feeds = random_feeds(shared, np.random.default_rng(0))
    original, after = run_ort(shared, feeds), run_ort(pruned, feeds)
    np.testing.assert_array_equal(original[1], after[1])  # the other reader still sees the whole bias


def test_weight_from_constant_node_freezes_group() -> None:
    model, _ = MOTIFS["conv_bn_relu"]()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    bias = next(t for t in model.graph.initializer if t.name == conv.input[2])
    model.graph.initializer.remove(bias)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [bias.name], value=bias, name="bias_const"))
    index = analyze(model)
    group = index.group(conv.output[0])
    assert group.frozen and "not an initializer" in group.frozen


def test_conv_without_bias_is_prunable() -> None:
    n = Net(0)
    y = n.op("Relu", [n.conv("x", 3, 8, bias=False)])
    index = analyze(n.model(n.head(n.conv(y, 8, 4), 4)))
    assert sorted(g.size for g in index.groups if g.prunable) == [4, 8]


def test_rules_are_a_plain_dict_of_functions() -> None:
    assert isinstance(CHANNEL_RULES, dict)
    assert {"Conv", "Gemm", "Concat", "Add", "Relu", "Flatten"} <= set(CHANNEL_RULES)
    assert all(callable(rule) for rule in CHANNEL_RULES.values())


def test_analysis_does_not_mutate_model() -> None:
    model, _ = MOTIFS["se_block"]()
    before = model.SerializeToString()
    analyze(model)
    assert model.SerializeToString() == before
    assert numpy_helper.to_array(model.graph.initializer[0]).size > 0


def test_tensor_read_inside_subgraph_freezes_group() -> None:
    n = Net(0)
    feat = n.op("Relu", [n.conv("x", 3, 8)])
    logits = n.head(n.conv(feat, 8, 4), 4)
    branch = onnx.helper.make_graph(
        [onnx.helper.make_node("ReduceMax", [feat], ["m"], keepdims=0)], "branch", [],
        [onnx.helper.make_tensor_value_info("m", onnx.TensorProto.FLOAT, None)])
    cond = n.const(np.array(True))
    n.nodes.append(onnx.helper.make_node("If", [cond], ["picked"], name="if_0", then_branch=branch,
                                         else_branch=branch))
    index = analyze(n.model(logits, "picked"))
    group = index.group(n.nodes[0].output[0])
    assert group.frozen == "read inside a subgraph of If 'if_0'"


def test_an_operand_the_analysis_cannot_follow_is_named_as_such_not_as_a_broadcast() -> None:
    """A residual Add whose other operand comes back from a channels-last LayerNorm (Transpose there and back, as a
    LayerNorm2d exports) freezes the stream with "input without channel layout", not "broadcast over channels"."""
    n = Net(0)
    y = n.op("Relu", [n.conv("x", 3, 8)])
    normed = n.op("LayerNormalization", [n.op("Transpose", [y], perm=[0, 2, 3, 1]), n.rand(8), n.rand(8)], axis=-1)
    back = n.op("Transpose", [normed], perm=[0, 3, 1, 2])
    z = n.op("Add", [n.conv(y, 8, 8), back])
    index = analyze(n.model(n.head(n.conv(z, 8, 16), 16)))
    reasons = [g.frozen for g in index.groups if g.frozen]
    assert any(r and r.startswith("input without channel layout at Add") for r in reasons), reasons
    assert not any(r and "broadcast" in r for r in reasons), reasons


def test_a_channels_last_detour_without_a_cross_channel_op_is_followed() -> None:
    """Transpose to channels-last and back, with an elementwise op in between: the channels move with their axis,
    so the residual Add unions the two convs' channels and both stay prunable (pruned == masked)."""
    n = Net(0)
    y = n.op("Relu", [n.conv("x", 3, 8)])
    last = n.op("Mul", [n.op("Transpose", [y], perm=[0, 2, 3, 1]), n.rand(8)])  # a per-channel scale, channels last
    z = n.op("Add", [n.conv(y, 8, 8), n.op("Transpose", [last], perm=[0, 3, 1, 2])])
    model = n.model(n.head(n.conv(z, 8, 16), 16))
    index = analyze(model)
    assert [g.size for g in index.groups if g.prunable] == [8, 16]
    plan = {g.id: [0, 2, 3, 5, 7][: g.size] for g in index.groups if g.prunable}
    feeds = random_feeds(model, np.random.default_rng(0))
    assert_same_outputs(zero_channels(model, index, plan), apply_plan(model, index, plan), feeds, rtol=1e-4)

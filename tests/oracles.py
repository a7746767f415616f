"""Test oracles: run models with onnxruntime, compare outputs, draw random valid pruning plans."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from graph_ops.groups import ChannelGroupIndex
from graph_ops.mask import zero_channels
from graph_ops.proto import node_name
from graph_ops.prune import kept_indices


def run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model on CPU with one thread; return all outputs in graph order."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def random_feeds(model: onnx.ModelProto, rng: np.random.Generator, batch: int = 2) -> dict[str, np.ndarray]:
    """Standard-normal float32 feeds for every graph input (dynamic dims -> ``batch``)."""
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for info in model.graph.input:
        if info.name in inits:
            continue
        dims = [d.dim_value if d.dim_value > 0 else batch for d in info.type.tensor_type.shape.dim]
        feeds[info.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                        rtol: float = 1e-4, atol: float = 0.0) -> float:
    """Assert that two models give the same outputs; return the worst error relative to max |output|.

    Each output pair must have equal shapes and ``max|a - b| <= rtol * max|a| + atol``.
    """
    worst = 0.0
    for out_a, out_b in zip(run_ort(a, feeds), run_ort(b, feeds), strict=True):
        assert out_a.shape == out_b.shape, f"output shapes differ: {out_a.shape} vs {out_b.shape}"
        scale = float(np.max(np.abs(out_a))) if out_a.size else 0.0
        err = float(np.max(np.abs(out_a.astype(np.float64) - out_b))) if out_a.size else 0.0
        assert err <= rtol * scale + atol, f"outputs differ: max abs err {err:.3g} vs max |out| {scale:.3g}"
        worst = max(worst, err / scale if scale else err)
    return worst


def random_valid_plan(index: ChannelGroupIndex, rng: np.random.Generator, low: float = 0.25,
                      high: float = 0.9) -> dict[str, list[int]]:
    """Keep a random ``low..high`` share (at least one channel) of every prunable group, in random order; a group
    in equal blocks (grouped convolutions) keeps the same random number in each block."""
    plan = {}
    for group in index.groups:
        if group.frozen:
            continue
        share = rng.uniform(low, high)
        per = group.size // group.blocks
        n_keep = int(min(per, max(1, round(share * per))))
        kept = [b * per + int(i) for b in range(group.blocks) for i in rng.permutation(per)[:n_keep]]
        plan[group.id] = [kept[i] for i in rng.permutation(len(kept))]
    return plan


def recovered_reference(original: onnx.ModelProto, recovered: onnx.ModelProto, index: ChannelGroupIndex,
                        keep: Mapping[str, Sequence[int]], names: set[str]) -> onnx.ModelProto:
    """The mask oracle of a recovered model: the original-size model carrying the recovered weights and biases of
    the layers ``names`` at their kept output rows and input slices, with the plan applied as a mask.

    What the removed slices hold does not matter once they are masked, so this model must compute what the recovered
    pruned model computes: it checks that recovery writes every weight in the surgery's layout.
    """
    plan = index.validate_keep(keep)
    full = onnx.ModelProto()
    full.CopyFrom(original)
    inits = {t.name: t for t in full.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in recovered.graph.initializer}
    by_name = {node_name(n, i): n for i, n in enumerate(recovered.graph.node)}
    for idx, node in enumerate(full.graph.node):
        name = node_name(node, idx)
        if name not in names:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]]).copy()
        has_bias = len(node.input) > 2 and bool(node.input[2])  # a MatMul has none
        bias = numpy_helper.to_array(inits[node.input[2]]).copy() if has_bias else None
        axes = [np.arange(n) for n in weight.shape]
        rows = np.arange(0 if bias is None else bias.shape[0])
        grouped = None  # a grouped conv's kept input channels (its columns differ per conv group)
        for edit in index.edits:
            if edit.node == idx and edit.kind == "grouped" and any(s.group_id in plan for s in
                                                                   index.by_tensor[edit.tensor]):
                grouped = (kept_indices(index.by_tensor[edit.tensor], plan),
                           sum(s.length for s in index.by_tensor[edit.tensor]))
            elif edit.node == idx and edit.kind == "take" and edit.pos in (1, 2):
                kept = kept_indices(index.by_tensor[edit.tensor], plan, edit.block)
                if edit.pos == 1:
                    axes[edit.axis] = kept
                else:
                    rows = kept
        refit = got[by_name[name].input[1]]
        if grouped is None:
            weight[np.ix_(*axes)] = refit
        else:  # row r (original row axes[0][r]) of conv group g holds the kept columns of group g, in order
            kept_in, c_in = grouped
            cin_g, cout_g = weight.shape[1], weight.shape[0] // (c_in // weight.shape[1])
            for r, row in enumerate(axes[0]):
                g = row // cout_g
                cols = kept_in[(kept_in >= g * cin_g) & (kept_in < (g + 1) * cin_g)] - g * cin_g
                weight[row, cols] = refit[r]
        if bias is not None:
            bias[rows] = got[by_name[name].input[2]]
        for pos, value in ((1, weight), (2, bias)):
            if value is not None:
                inits[node.input[pos]].CopyFrom(numpy_helper.from_array(value, node.input[pos]))
    return zero_channels(full, index, keep)


def check_exact_surgery(model: onnx.ModelProto, index: ChannelGroupIndex, feeds: Mapping[str, np.ndarray],
                        seeds: Sequence[int] = (0, 1, 2)) -> tuple[float, bool]:
    """Seeded random valid plans applied (the surgery runs the full checker) against the mask oracle, and the plan
    that keeps every channel against the original; returns the worst output error relative to the largest output
    and whether the predicted MACs and params equal those counted on every pruned model."""
    from graph_ops.cost import count
    from graph_ops.prune import apply_plan

    worst, equal = 0.0, True
    for seed in seeds:
        plan = random_valid_plan(index, np.random.default_rng(seed))
        pruned = apply_plan(model, index, plan)
        worst = max(worst, assert_same_outputs(zero_channels(model, index, plan), pruned, feeds, rtol=1e-4))
        counted = count(pruned)
        equal = equal and index.predict({gid: len(kept) for gid, kept in plan.items()}) == (counted.macs,
                                                                                              counted.params)
    everything = {g.id: list(range(g.size)) for g in index.groups}
    for a, b in zip(run_ort(model, feeds), run_ort(apply_plan(model, index, everything), feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(np.max(np.abs(a))))
    return worst, equal


def check_lstsq_mask_reference(model: onnx.ModelProto, index: ChannelGroupIndex,
                               min_refit: int = 3) -> tuple[onnx.ModelProto, onnx.ModelProto, object]:
    """R3 recovery of a seeded random plan (50-90 % kept) on four seeded unlabelled samples (recovery never reads
    labels) must pass the full checker, refit at least ``min_refit`` layers and equal its recovered mask reference
    (:func:`recovered_reference`); returns the pruned model, the recovered model and the recovery report."""
    from graph_ops.prune import apply_plan
    from pipeline.data.datasets import from_iterable
    from pipeline.recovery import recover

    keep = random_valid_plan(index, np.random.default_rng(0), 0.5, 0.9)
    rng = np.random.default_rng(1)
    samples = [random_feeds(model, rng, batch=1) for _ in range(4)]
    data = from_iterable([(next(iter(feeds.values())), None) for feeds in samples])
    pruned = apply_plan(model, index, keep)
    recovered, report = recover(model, pruned, index, keep, data, method="lstsq", ridge=1e-2, batch_size=1,
                                refit_positions=16, intra_op_threads=2)
    onnx.checker.check_model(recovered, full_check=True)
    refit = {c.node for c in report.consumers if c.alpha is not None}
    assert len(refit) >= min_refit, report.skipped
    assert_same_outputs(recovered_reference(model, recovered, index, keep, refit), recovered, samples[0],
                        rtol=1e-4, atol=1e-5)
    return pruned, recovered, report


def check_prepared_surgery(prepared: object, shapes: Sequence[tuple[int, ...]], *, rtol: float = 1e-4,
                           atol: float = 0.0, seeds: Sequence[int] = (0, 1, 2)) -> tuple[float, bool]:
    """Seeded random valid plans applied to a prepared model with the file's own input and output dims restored
    (``PreparedModel.restore_io``) against the mask oracle, with seeded standard-normal inputs of every shape in
    ``shapes`` (e.g. the analysis size and another batch and width), each pruned model declaring the file's inputs
    and outputs; returns the worst output error relative to the largest output and whether the MACs and params
    counted at the prepared sizes (``PreparedModel.count``, every node resolved) equal the prediction."""
    from graph_ops.io import load_model
    from graph_ops.prune import apply_plan

    model, index = prepared.model, prepared.index  # type: ignore[attr-defined]
    inits = {t.name for t in model.graph.initializer}
    name = next(i.name for i in model.graph.input if i.name not in inits)
    declared = load_model(prepared.path).graph  # type: ignore[attr-defined]
    worst, equal = 0.0, True
    for seed in seeds:
        plan = random_valid_plan(index, np.random.default_rng(seed))
        pruned = prepared.restore_io(apply_plan(model, index, plan))  # type: ignore[attr-defined]
        masked = zero_channels(model, index, plan)
        for shape in shapes:
            feeds = {name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
            worst = max(worst, assert_same_outputs(masked, pruned, feeds, rtol=rtol, atol=atol))
        for mine, theirs in ((pruned.graph.input, [i for i in declared.input if i.name == name]),
                             (pruned.graph.output, declared.output)):
            assert [i.name for i in mine] == [i.name for i in theirs]
            for ours, file in zip(mine, theirs, strict=True):  # the file's declared dims, -1 and symbols included
                assert not file.type.tensor_type.HasField("shape") or ours.type.tensor_type.shape == (
                    file.type.tensor_type.shape), (ours, file)
        counted = prepared.count(pruned)  # type: ignore[attr-defined]
        predicted = index.predict({gid: len(kept) for gid, kept in plan.items()})
        equal = equal and not counted.unresolved and (counted.macs, counted.params) == predicted
    return worst, equal

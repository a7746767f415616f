"""The mask-only oracle: a plan as a soft mask, ``zero_channels(model, index, keep)``.

Instead of removing channels, zero the *exit weights* that read them: for every consumer edit recorded by analysis
(Conv ``W[:, c]``, ConvTranspose ``W[c]``, Gemm / MatMul K rows, in blocks of ``H*W`` after Flatten; for a grouped
Conv, ``W[o, j]`` for the rows ``o`` of the conv group that reads channel ``c``), the slices at the removed indices
become 0. Shapes do not change. Because a removed channel reaches the outputs only through those
weights (analysis freezes every other path), the masked model computes what ``apply_plan`` computes, which is the
differential test of surgery (style.md 1.7, oracle 3). Intended for tests and debugging, not for deployment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from graph_ops.groups import ChannelGroupIndex
from graph_ops.proto import fingerprint
from graph_ops.prune import kept_indices


def zero_channels(model: onnx.ModelProto, index: ChannelGroupIndex,
                  keep: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Return a copy of ``model`` whose exit weights ignore the channels a plan drops.

    Args:
        model: the model ``index`` was computed from (not mutated).
        index: ``graph_ops.channels.analyze(model)`` (its edits are used; checked by fingerprint).
        keep: group id -> kept channel indices, as for ``apply_plan``.

    Raises:
        PlanValidationError: the plan or the index does not fit the model.
    """
    index.check_model(fingerprint(model))
    plan = index.validate_keep(keep)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    values: dict[str, np.ndarray] = {}
    for edit in index.edits:
        segments = index.by_tensor[edit.tensor]
        if edit.role != "consumer" or not any(seg.group_id in plan for seg in segments):
            continue
        name = out.graph.node[edit.node].input[edit.pos]
        value = values.setdefault(name, numpy_helper.to_array(inits[name]).copy())
        kept = kept_indices(segments, plan, edit.block)
        if edit.kind == "grouped":  # W[o, j] reads input channel (o's conv group) * C_in/group + j
            channels = sum(seg.length for seg in segments)
            cin_g = value.shape[1]
            cout_g = value.shape[0] // (channels // cin_g)
            for channel in np.setdiff1d(np.arange(channels), kept):
                conv_group = channel // cin_g
                value[conv_group * cout_g:(conv_group + 1) * cout_g, channel - conv_group * cin_g] = 0
            continue
        removed = np.setdiff1d(np.arange(value.shape[edit.axis]), kept)
        index_tuple = [slice(None)] * value.ndim
        index_tuple[edit.axis] = removed
        value[tuple(index_tuple)] = 0
    for name, value in values.items():
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return out

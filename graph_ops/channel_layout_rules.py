"""Channel rules for ops that move channels around: Concat, Split, Slice, Flatten, Reshape.

Part of ``graph_ops.channel_rules.CHANNEL_RULES`` (the one registry); the layout algebra, in segments
``(space, offset, start, n)`` of a tensor's channel axis:

* **Concat** on axis 1 lays its inputs' segments end to end (offsets shifted by the preceding inputs' widths; an
  input computed by an op analysis does not follow is a frozen segment of its static width); on any other axis the
  inputs must share one layout, so their spaces are unioned.
* **Split / Slice** on axis 1 (Slice with step 1) keep the parts of the segments inside ``[lo, hi)``, re-offset by
  ``-lo``; a bound inside a segment cuts its space there (the pieces on either side become separate groups once
  analysis refines the spaces, :mod:`graph_ops.channel_spaces`). Surgery recomputes sizes and bounds from the kept
  channels. A channel step or an empty range freezes. On other axes the layout passes through.
* **Flatten / Reshape** of ``[N, C, H, W]`` to ``[N, C*H*W]`` is channel-major, so channel ``c`` owns the block
  ``[c*H*W, (c+1)*H*W)`` of the Gemm / MatMul K axis; it is accepted only when every reader is such a dense op with
  a constant weight (recorded in ``Analysis.flat``) and the target provably keeps the batch and merges the rest:
  ``[0, -1]``, ``[Shape(x)[0], -1]`` (Paddle, ``x.view(x.size(0), -1)``), ``[-1, C*H*W]`` (TF / Keras; the constant
  is rewritten to ``kept*H*W``), ``[N, C]`` when ``H*W = 1``. ``[N, C] -> [N, C]`` is the identity, and so is a
  reshape of the spatial axes only (``[N, C, H, W] -> [N, C, H*W]``) whose channel entry is ``0``, the input's own
  count read through ``Shape`` (:mod:`graph_ops.channel_shape_rules`) or a constant that surgery rewrites.
* **Regrouping** (any channel axis, :meth:`Analysis.channel_axis`): a reshape that splits the channel axis into
  ``K`` branches of ``C / K`` (``[N, K*C', ...] -> [N, K, C', ...]``, the attention logits of selective-kernel and
  split attention) unions the ``K`` blocks (channel ``k*C' + c`` of the input is channel ``c`` of branch ``k``, so
  they are removed together); one that merges the ``K`` positions *before* the channel axis into it (the branches
  back, ``[N, H, W, C] -> [N, H*W*C]`` of a channels-last map) gives ``K`` copies of the layout; one that only moves
  it among unit or other axes keeps it. The channel entry is rewritten by surgery. Merging the channels with an axis
  *after* them is a channel-major flatten (above) or, after a Transpose, a channel shuffle: it freezes, with that
  reason. Anything else (a split into heads, patches) freezes.

Concat, Split and Slice read the channel axis of their input, so stacking branches on axis 1 unions them and
slicing a branch passes the layout on.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx

from graph_ops.channel_shape_rules import channel_entry_ok, tracked
from graph_ops.channel_state import Analysis, Edit, Seg, attr, describe, int_list, static_prod


def concat(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Concat on axis 1 lays segments end to end; on other axes it unions the inputs' spaces."""
    ins = [t for t in node.input if t]
    if not any(a.lay(t) for t in ins):
        return
    rank, where = a.rank(node.output[0]), describe(node, idx)
    unlaid = [t for t in ins if a.lay(t) is None]
    if rank is not None and unlaid and _fixed_parts(a, node, unlaid, rank):
        for t in unlaid:  # computed by an op analysis does not follow: kept whole, the other parts stay prunable
            a.new_space(t, a.shapes[t][1], None, frozen=f"input without channel layout at {where}")  # type: ignore[index]
    if rank is None or any(a.lay(t) is None for t in ins):
        a.freeze_inputs(node, f"input without channel layout at {where}")
        return
    if len({a.channel_axis(t) for t in ins}) > 1:
        a.freeze_inputs(node, f"channels on different axes at {where}")
        return
    axis = int(attr(node, "axis", 0)) % rank  # type: ignore[arg-type]
    if axis != a.channel_axis(ins[0]):
        for other in ins[1:]:
            a.union_layouts(ins[0], other, where)
        a.layout[node.output[0]] = list(a.layout[ins[0]])
        a.mark_like(ins[0], node.output[0])
        return
    segs, offset = [], 0
    for t in ins:
        segs.extend((s, offset + off, start, n) for s, off, start, n in a.layout[t])
        offset += a.channels(t)
    a.layout[node.output[0]] = segs
    a.mark_like(ins[0], node.output[0])


def _fixed_parts(a: Analysis, node: onnx.NodeProto, unlaid: list[str], rank: int) -> bool:
    """True when a Concat on axis 1 of ``[N, C, ...]`` tensors has parts without a channel layout whose channel count
    is static: they become frozen segments (never pruned) and the parts with a layout keep theirs."""
    axis = int(attr(node, "axis", 0)) % rank  # type: ignore[arg-type]
    laid = [t for t in node.input if t and a.lay(t)]
    return axis == 1 and rank >= 2 and all(a.channel_axis(t) == 1 for t in laid) and all(
        a.rank(t) == rank and (a.shapes.get(t) or (None, None))[1] for t in unlaid)


def _cut(a: Analysis, x: str, lo: int, hi: int) -> list[Seg] | None:
    """Segments of ``x`` inside ``[lo, hi)``, re-offset by ``-lo``; a bound inside a segment keeps the part of it
    (analysis later refines its space there); None for an empty range."""
    if not 0 <= lo < hi <= a.channels(x):
        return None
    out = []
    for space, off, start, n in a.layout[x]:
        first, last = max(lo, off), min(hi, off + n)
        if first < last:
            out.append((space, first - lo, start + first - off, last - first))
    return out


def split(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Split on axis 1 (sizes recomputed by surgery); other axes pass through."""
    x = node.input[0]
    if a.lay(x) is None:
        return
    rank, cax = a.rank(x) or 0, a.channel_axis(x)
    if rank < 2 or int(attr(node, "axis", 0)) % rank != cax:  # type: ignore[arg-type]
        for out in node.output:
            a.layout[out] = list(a.layout[x])
            a.mark_like(x, out)
        return
    sizes = [(a.shapes.get(o) or (None,) * (cax + 1))[cax] for o in node.output]
    lo, cuts = 0, []
    for out, size in zip(node.output, sizes, strict=True):
        cut = _cut(a, x, lo, lo + size) if size else None
        if cut is None:
            a.freeze(x, f"Split with unknown or empty sizes at {describe(node, idx)}")
            return
        cuts.append((out, cut))
        lo += size
    for out, cut in cuts:
        a.layout[out] = cut
        a.mark_like(x, out)
    a.edits.append(Edit("split", idx, x))


def slice_(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Slice: axis 1 with step 1 and constant bounds (surgery recomputes them); other axes pass through."""
    x, where = node.input[0], describe(node, idx)
    if a.lay(x) is None:
        return
    rank = a.rank(x) or 0
    starts, ends = int_list(a, node, 1, "starts"), int_list(a, node, 2, "ends")
    axes, steps = int_list(a, node, 3, "axes"), int_list(a, node, 4, "steps")
    if starts is None or ends is None or rank < 2 or attr(node, "starts") is not None:
        a.freeze(x, f"dynamic or legacy Slice at {where}")
        return
    axes, cax = [ax % rank for ax in (axes if axes is not None else range(len(starts)))], a.channel_axis(x)
    if cax not in axes:
        a.layout[node.output[0]] = list(a.layout[x])
        a.mark_like(x, node.output[0])
        return
    j, c = axes.index(cax), a.channels(x)
    lo, hi = (v + c if v < 0 else v for v in (starts[j], ends[j]))
    cut = None if steps and steps[j] != 1 else _cut(a, x, min(max(lo, 0), c), min(max(hi, 0), c))
    if not cut:
        a.freeze(x, f"Slice of channels with a step or an empty range at {where}")
        return
    a.layout[node.output[0]] = cut
    a.mark_like(x, node.output[0])
    a.edits.append(Edit("slice", idx, x, axis=j))


def _flatten_to_dense(a: Analysis, node: onnx.NodeProto, idx: int, x: str) -> bool:
    """Record ``x`` as a channel-major flattened input of Gemm/MatMul readers (block = H*W) if proven."""
    xshape, y = a.shapes.get(x), node.output[0]
    if not xshape or len(xshape) < 3 or static_prod(xshape[1:]) is None or y in a.outputs:
        return False
    readers = a.readers.get(y, [])
    ok = readers and all(
        len(r.input) > 1 and r.input[0] == y and y not in r.input[1:] and a.is_const(r.input[1]) and (
            (r.op_type == "Gemm" and not attr(r, "transA", 0)) or r.op_type == "MatMul")
        for r in readers)
    if ok:
        a.flat[y] = (x, math.prod(xshape[2:]))  # type: ignore[arg-type]
    return bool(ok)


def flatten(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Flatten(axis=1): identity on [N, C]; channel-major into Gemm/MatMul; otherwise freeze."""
    x = node.input[0]
    if a.lay(x) is None:
        return
    axis = int(attr(node, "axis", 1))  # type: ignore[arg-type]
    if axis == 1 and a.rank(x) == 2:
        a.layout[node.output[0]] = list(a.layout[x])
    elif axis != 1 or not _flatten_to_dense(a, node, idx, x):
        a.freeze(x, f"Flatten not provably channel-major into Gemm at {describe(node, idx)}")


def _fixed(entries: list, x: str, xshape: tuple) -> list[int] | None:
    """The entries as static sizes (constants, ``x``'s own static dims), or None when one is unknown or ``-1``."""
    sizes = [xshape[e[1]] if isinstance(e, tuple) and e[0] == x else e for e in entries]
    return sizes if all(isinstance(v, int) and v >= 0 for v in sizes) else None  # type: ignore[return-value]


def _batch_ok(a: Analysis, x: str, target: list, xshape: tuple, rest_start: int, rest_size: int | None) -> bool:
    """Entry 0 keeps ``x``'s batch for every input size: copied / read through ``Shape`` / static, or ``-1`` when
    every entry from ``rest_start`` on is a static size whose product is ``rest_size`` (the batch is then inferred as
    ``N``)."""
    if a.keeps_batch(target[0], x):
        return True
    fixed = _fixed(target[rest_start:], x, xshape)
    return target[0] == -1 and fixed is not None and rest_size is not None and math.prod(fixed) == rest_size


Slot = Callable[[int], "tuple[int, int, int] | None"]  # target entry -> (node, input, index) of the constant holding it


def _entry_slot(a: Analysis, node: onnx.NodeProto, idx: int, j: int) -> tuple[int, int, int] | None:
    """Where surgery can rewrite entry ``j`` of a Reshape target: the constant target itself, or the constant piece
    of a ``Concat`` (read by this Reshape only) that computes the target from ``Shape`` and constants; None when the
    entry is not a constant it can edit."""
    name = node.input[1]
    if a.is_const(name):
        return idx, 1, j
    producer = a.producer.get(name)
    if producer is None or a.uses.get(name, 0) != 1 or a.graph.node[producer].op_type != "Concat":
        return None
    offset = 0
    for pos, piece in enumerate(a.graph.node[producer].input):
        entries = tracked(a, piece)
        if entries is None:
            return None
        if offset <= j < offset + len(entries):
            return (producer, pos, j - offset) if a.is_const(piece) else None
        offset += len(entries)
    return None


def _vector_edit(a: Analysis, where: tuple[int, int, int], tensor: str, block: int = 1) -> None:
    a.edits.append(Edit("vector", where[0], tensor, pos=where[1], axis=where[2], block=block))


def _dense_flatten(a: Analysis, node: onnx.NodeProto, idx: int, x: str, target: list, slot: Slot) -> bool:
    """``[N, C, ...] -> [N, C*H*W]`` (entry 1: ``-1``, the explicit ``C*H*W``, or ``x``'s own count when ``H*W`` is 1)
    into Gemm / MatMul readers; an explicit count is rewritten by surgery (block ``H*W``)."""
    xshape = a.shapes[x]
    flat = static_prod(xshape[1:])
    if flat is None or len(target) != 2:
        return False
    own = target[1] == (x, 1) and flat == xshape[1]
    where = slot(1) if target[1] == flat else None
    ok = (target[1] == -1 and a.keeps_batch(target[0], x)) or ((own or where is not None) and (
        a.keeps_batch(target[0], x) or target[0] == -1))
    if not ok or not _flatten_to_dense(a, node, idx, x):
        return False
    if where is not None:
        _vector_edit(a, where, x, a.flat[node.output[0]][1])
    return True


def _same_channels(a: Analysis, node: onnx.NodeProto, idx: int, x: str, target: list, slot: Slot) -> bool:
    """Reshape that keeps axes 0 and 1 and reshapes only the spatial axes (``[N, C, H, W] -> [N, C, H*W]``, or
    ``[N, C] -> [N, C, 1, 1]``): entry 1 is ``0`` / ``x``'s own count (nothing to edit), the explicit count
    (rewritten), or ``-1`` with the batch kept and the rest static; with a batch kept, the element count forces the
    rest to hold ``H*W``."""
    xshape, c = a.shapes[x], a.channels(x)
    rest = target[2:]
    own = target[1] in (0, (x, 1))
    where = slot(1) if target[1] == c else None
    explicit = where is not None
    fixed, spatial = _fixed(rest, x, xshape), static_prod(xshape[2:])
    inferred = target[1] == -1 and a.keeps_batch(target[0], x) and fixed is not None and spatial is not None and (
        math.prod(fixed) == spatial)  # [N, -1, 1, 1] of [N, C]: the count is the rest of a kept batch
    if sum(1 for e in target if e == -1) > 1 or any(e == 0 for e in rest) or not (own or explicit or inferred):
        return False
    if not _batch_ok(a, x, target, xshape, 2, static_prod(xshape[2:])):
        return False
    yshape = a.shapes.get(node.output[0])
    if yshape is not None and len(yshape) >= 2 and yshape[1] != c:
        return False
    a.layout[node.output[0]] = list(a.layout[x])
    a.mark_like(x, node.output[0])
    if where is not None:
        _vector_edit(a, where, x)
    return True


def _regroup(a: Analysis, node: onnx.NodeProto, idx: int, x: str, target: list, slot: Slot) -> bool:
    """A reshape that moves the channel axis (at ``cax``, with ``P`` positions of the axes before it and ``Q``
    after it, batch excluded) to output axis ``q`` with ``P'`` positions before it, exactly, for every input size:

    * the same channels (``P' = P``): the layout passes on (e.g. ``[N, C] -> [N, C, 1, 1]``, a view that drops unit
      axes);
    * a split (``P' = K P``, ``C' = C / K``): the channel axis becomes ``K`` branches of ``C / K`` channels; channel
      ``k*C' + c`` of the input is channel ``c`` of branch ``k`` (row-major), so the ``K`` blocks are unioned;
    * a merge (``P' = P / K``, ``C' = K C``): the last ``K`` positions before the channel axis (branches, or the
      positions of a channels-last map) join it: the output holds ``K`` copies of the layout.

    Entry 0 keeps the batch (or is ``-1`` with every other entry static); the entries before ``q`` are static; the
    channel entry is static (rewritten by surgery) or ``-1`` with the entries after it static; the element count then
    forces the entries after ``q`` to hold ``Q``. Merging the channels with an axis after them (a channel shuffle)
    is not one of these and freezes."""
    xshape, cax, c = list(a.shapes[x]), a.channel_axis(x), a.channels(x)
    if x in a.last_axis or len(xshape) <= cax:
        return False
    xshape[cax] = c  # the layout's width, where shape inference left the axis unknown
    if None in xshape[1:]:
        return False
    before, after = math.prod(xshape[1:cax]), math.prod(xshape[cax + 1:])  # type: ignore[arg-type]
    static = all(isinstance(e, int) and e > 0 for e in target[1:])
    if not (a.keeps_batch(target[0], x) or (target[0] == -1 and static and math.prod(target[1:]) == before * c * after)):
        return False
    yshape = a.shapes.get(node.output[0])
    for q in range(1, len(target)):
        pre, entry, post = target[1:q], target[q], target[q + 1:]
        if not all(isinstance(e, int) and e > 0 for e in pre):
            return False
        p2 = math.prod(pre)
        if entry == -1 and all(isinstance(e, int) and e > 0 for e in post) and (before * c * after) % (
                p2 * math.prod(post)) == 0:
            width, where = (before * c * after) // (p2 * math.prod(post)), None
        elif isinstance(entry, int) and entry > 0:
            width, where = entry, slot(q)
            if where is None:
                continue
        else:
            continue
        if yshape is not None and (len(yshape) != len(target) or yshape[q] not in (width, None)):
            continue
        if p2 == before and width == c:
            a.layout[node.output[0]] = list(a.layout[x])
        elif p2 > before and p2 % before == 0 and width * (p2 // before) == c:
            blocks = [_cut(a, x, j * width, (j + 1) * width) for j in range(p2 // before)]
            for block in blocks[1:]:
                a.union_segments(blocks[0], block)  # type: ignore[arg-type]
            a.layout[node.output[0]] = blocks[0]  # type: ignore[assignment]
        elif before > p2 and before % p2 == 0 and width == c * (before // p2):
            a.layout[node.output[0]] = [(s, off + j * c, start, n) for j in range(before // p2)
                                        for s, off, start, n in a.layout[x]]
        else:
            continue
        a.set_axis(node.output[0], q)
        if where is not None:
            _vector_edit(a, where, node.output[0])
        return True
    return False


def _shuffle(a: Analysis, x: str, target: list) -> bool:
    """True when a reshape merges channels with the axis after them that a Transpose just put there: the last step
    of a channel shuffle (``[N, g, C/g, H, W] -> Transpose -> [N, C/g, g, H, W] -> [N, C, H, W]``)."""
    xshape, cax = a.shapes[x], a.channel_axis(x)
    producer = a.producer.get(x)
    node = a.graph.node[producer] if producer is not None else None
    moved = node is not None and node.op_type == "Transpose" and a.channel_axis(node.input[0]) > cax
    return moved and len(xshape) > cax + 1 and xshape[cax + 1] not in (1, None) and len(target) < len(xshape)


def reshape(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Reshape: a channel-major flatten into Gemm/MatMul, a reshape of the spatial axes only, the split of a
    producer's channel blocks into branches (and back); the target is a constant (entries rewritten by surgery) or
    computed through ``Shape`` (:mod:`graph_ops.channel_shape_rules`: batch and spatial entries read at run time, the
    channel count only as the input's own). Anything else that moves channels (heads, a channel shuffle) freezes."""
    x = node.input[0]
    if a.lay(x) is None:
        return
    legacy = int_list(a, node, 1, "shape") if attr(node, "shape") is not None else None
    target = legacy if legacy is not None else channel_entry_ok(a, node, 1, x)
    def slot(j: int) -> tuple[int, int, int] | None:
        return None if legacy is not None else _entry_slot(a, node, idx, j)

    xshape = a.shapes.get(x)
    usable = target is not None and xshape is not None and len(xshape) > a.channel_axis(x) and len(
        target) >= 2 and not (attr(node, "allowzero", 0) and 0 in target)  # type: ignore[operator]
    rules = (_dense_flatten, _same_channels, _regroup) if a.channel_axis(x) == 1 else (_regroup,)
    if usable and any(rule(a, node, idx, x, target, slot) for rule in rules):  # type: ignore[arg-type]
        return
    if usable and _shuffle(a, x, target):  # type: ignore[arg-type]
        a.freeze(x, f"channel shuffle at {describe(node, idx)}: the kept channels of its blocks would interleave "
                    f"in another order after pruning")
    else:
        a.freeze(x, f"reshape of the channel axis at {describe(node, idx)}")

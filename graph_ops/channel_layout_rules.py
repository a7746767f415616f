"""Channel rules for ops that move channels around: Concat, Split, Slice, Flatten, Reshape.

Part of ``graph_ops.channel_rules.CHANNEL_RULES`` (the one registry); the layout algebra, in segments
``(space, offset, start, n)`` of a tensor's channel axis:

* **Concat** on axis 1 lays its inputs' segments end to end (offsets shifted by the preceding inputs' widths); on
  any other axis the inputs must share one layout, so their spaces are unioned.
* **Split / Slice** on axis 1 (Slice with step 1) keep the parts of the segments inside ``[lo, hi)``, re-offset by
  ``-lo``; a bound inside a segment cuts its space there (the pieces on either side become separate groups once
  analysis refines the spaces, :mod:`graph_ops.channel_spaces`). Surgery recomputes sizes and bounds from the kept
  channels. A channel step or an empty range freezes. On other axes the layout passes through.
* **Flatten / Reshape** of ``[N, C, H, W]`` to ``[N, C*H*W]`` is channel-major, so channel ``c`` owns the block
  ``[c*H*W, (c+1)*H*W)`` of the Gemm / MatMul K axis; it is accepted only when every reader is such a dense op with
  a constant weight (recorded in ``Analysis.flat``). ``[N, C] -> [N, C]`` is the identity, and so is a reshape of the
  spatial axes only (``[N, C, H, W] -> [N, C, H*W]``) whose channel entry is ``0``, the input's own count read
  through ``Shape`` (:mod:`graph_ops.channel_shape_rules`) or a constant that surgery rewrites. Anything else
  (a channel shuffle, a split into heads) freezes.
"""

from __future__ import annotations

import math

import onnx

from graph_ops.channel_shape_rules import channel_entry_ok
from graph_ops.channel_state import Analysis, Edit, Seg, attr, describe, int_list, static_prod


def concat(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Concat on axis 1 lays segments end to end; on other axes it unions the inputs' spaces."""
    ins = [t for t in node.input if t]
    if not any(a.lay(t) for t in ins):
        return
    rank, where = a.rank(node.output[0]), describe(node, idx)
    if rank is None or any(a.lay(t) is None for t in ins):
        a.freeze_inputs(node, f"input without channel layout at {where}")
        return
    axis = int(attr(node, "axis", 0)) % rank  # type: ignore[arg-type]
    if axis != 1:
        for other in ins[1:]:
            a.union_layouts(ins[0], other, where)
        a.layout[node.output[0]] = list(a.layout[ins[0]])
        return
    segs, offset = [], 0
    for t in ins:
        segs.extend((s, offset + off, start, n) for s, off, start, n in a.layout[t])
        offset += a.channels(t)
    a.layout[node.output[0]] = segs


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
    rank = a.rank(x) or 0
    if rank < 2 or int(attr(node, "axis", 0)) % rank != 1:  # type: ignore[arg-type]
        for out in node.output:
            a.layout[out] = list(a.layout[x])
        return
    sizes = [(a.shapes.get(o) or (None, None))[1] for o in node.output]
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
    axes = [ax % rank for ax in (axes if axes is not None else range(len(starts)))]
    if 1 not in axes:
        a.layout[node.output[0]] = list(a.layout[x])
        return
    j, c = axes.index(1), a.channels(x)
    lo, hi = (v + c if v < 0 else v for v in (starts[j], ends[j]))
    cut = None if steps and steps[j] != 1 else _cut(a, x, min(max(lo, 0), c), min(max(hi, 0), c))
    if not cut:
        a.freeze(x, f"Slice of channels with a step or an empty range at {where}")
        return
    a.layout[node.output[0]] = cut
    a.edits.append(Edit("slice", idx, x, axis=j))


def _flatten_to_dense(a: Analysis, node: onnx.NodeProto, idx: int, x: str) -> bool:
    """Record ``x`` as a channel-major flattened input of Gemm/MatMul readers (block = H*W) if proven."""
    xshape, y = a.shapes.get(x), node.output[0]
    if not xshape or len(xshape) < 3 or static_prod(xshape[1:]) is None or y in a.outputs:
        return False
    readers = a.readers.get(y, [])
    ok = readers and all(
        r.input[0] == y and y not in r.input[1:] and a.is_const(r.input[1]) and (
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


def _spatial_only(a: Analysis, x: str, target: list, xshape: tuple) -> bool:
    """``target`` keeps axis 0 and the channel axis of ``x`` and reshapes only the spatial axes."""
    rest, spatial = target[2:], xshape[2:]
    if sum(1 for e in target if e == -1) > 1 or any(e == 0 for e in rest):
        return False
    if target[0] not in (0, (x, 0)) and not (isinstance(target[0], int) and target[0] in (xshape[0], -1)):
        return False
    if -1 in rest:
        return target[0] != -1
    if rest == [(x, axis) for axis in range(2, len(xshape))]:
        return True
    sizes = [xshape[e[1]] if isinstance(e, tuple) and e[0] == x else e for e in rest]
    return all(isinstance(v, int) for v in sizes) and static_prod(spatial) == math.prod(sizes)


def reshape(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Reshape: [N,C,...] -> [N, C*H*W] into Gemm/MatMul (shape entry recomputed), [N,C] -> [N,C], and reshapes of
    the spatial axes only ([N,C,H,W] -> [N,C,H*W]; the channel entry is the input's own count or recomputed);
    anything that moves channels (heads, channel shuffles) freezes."""
    x, y = node.input[0], node.output[0]
    if a.lay(x) is None:
        return
    const_target, xshape = int_list(a, node, 1, "shape"), a.shapes.get(x)
    target = const_target if const_target is not None else channel_entry_ok(a, node, 1, x)
    c = a.channels(x)
    ok = target is not None and xshape is not None and len(xshape) >= 2 and len(target) >= 2 and not (
        attr(node, "allowzero", 0) and 0 in target)  # type: ignore[operator]
    if ok and const_target is not None and len(target) == 2:  # type: ignore[arg-type]
        if len(xshape) == 2 and target[1] in (c, -1) and target[0] != -1:  # type: ignore[index]
            a.layout[y] = list(a.layout[x])
            return
        flat = static_prod(xshape[1:])  # type: ignore[index]
        if flat and target[1] in (flat, -1) and _flatten_to_dense(a, node, idx, x):  # type: ignore[index]
            if target[1] != -1:  # type: ignore[index]
                a.edits.append(Edit("vector", idx, x, pos=1, axis=1, block=a.flat[y][1]))
            return
    own = target[1] in (0, (x, 1)) if ok else False  # type: ignore[index]
    edited = ok and const_target is not None and target[1] == c  # type: ignore[index]
    if (own or edited) and len(xshape) > 2 and _spatial_only(a, x, target, xshape):  # type: ignore[arg-type]
        a.layout[y] = list(a.layout[x])
        if edited:
            a.edits.append(Edit("vector", idx, x, pos=1, axis=1))
        return
    a.freeze(x, f"reshape of the channel axis at {describe(node, idx)}")

"""Shape arithmetic that reads a channel count: which uses stay exact after pruning, which freeze.

Exporters compute sizes at run time from ``Shape`` (a dynamic batch keeps them from folding): ``F.interpolate(g,
size=...)`` becomes ``Resize(g, sizes=Concat(Slice(Shape(g), 0, 2), [H, W]))``, a detection head's
``x.view(n, C, -1)`` reads ``n`` from ``Gather(Shape(x), 0)``. After pruning, ``Shape`` returns the pruned width, so
an integer vector that holds the channel count of a tensor ``t`` is consistent exactly where that count is used as
the channel count of ``t`` itself again. Analysis therefore tracks integer shape vectors entry by entry
(``Analysis.dims``): an entry is ``(t, axis)`` (dimension ``axis`` of tensor ``t``), an integer, or unknown.

* ``Shape`` (with ``start`` / ``end``), ``Gather`` / ``Slice`` on axis 0 with constant indices, ``Concat`` on axis 0,
  ``Unsqueeze`` / ``Squeeze`` / ``Cast`` / ``Identity`` propagate entries (``SHAPE_RULES``).
* ``Resize`` sizes and ``Reshape`` shapes may hold ``(x, 1)`` at entry 1 when ``x`` is the op's own data input
  (the channel count follows the pruned width; :mod:`graph_ops.channel_rules` and
  :mod:`graph_ops.channel_layout_rules` check this).
* Any other use of an entry ``(t, 1)`` (arithmetic, ``Expand``, ``Range``, a ``Reshape`` of another tensor, a
  graph output) freezes the channels of ``t``: the graph would compute with the pruned count in a way analysis does
  not follow (fail closed). Entries for other axes (batch, spatial) do not change under pruning and flow freely.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from graph_ops.channel_state import Analysis, Dim, attr, describe, int_list

ShapeRule = Callable[[Analysis, onnx.NodeProto, int], None]


def _entries(a: Analysis, name: str) -> list[Dim] | None:
    """Tracked entries of an integer vector: from ``Analysis.dims`` or a small integer constant."""
    if name in a.dims:
        return a.dims[name]
    value = a.const(name)
    if value is not None and value.dtype.kind in "iu" and value.size <= 64:
        return [int(v) for v in value.ravel()]
    return None


def shape(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Shape(x)[start:end]: entries ``(x, axis)``."""
    rank = a.rank(node.input[0])
    if rank is None:
        return
    if node.input[0] in a.last_axis:  # the shape rules follow channel counts on axis 1 only
        a.freeze(node.input[0], f"Shape of a tensor with channels on its last axis at {describe(node, idx)}")
    start, end = int(attr(node, "start", 0)), attr(node, "end", None)  # type: ignore[arg-type]
    axes = list(range(rank))[start:end if end is None else int(end)]  # type: ignore[call-overload]
    a.dims[node.output[0]] = [(node.input[0], ax) for ax in axes]


def same(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Unsqueeze / Squeeze / Cast / Identity of an integer vector: same entries."""
    entries = _entries(a, node.input[0])
    if entries is not None:
        a.dims[node.output[0]] = list(entries)


def gather(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Gather on axis 0 with constant indices."""
    entries, indices = _entries(a, node.input[0]), a.const(node.input[1])
    if entries is None or indices is None or int(attr(node, "axis", 0)) != 0:  # type: ignore[arg-type]
        release(a, node, idx)
        return
    a.dims[node.output[0]] = [entries[int(i)] for i in indices.ravel()]


def slice_(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Slice on axis 0 with constant bounds and step 1."""
    entries = _entries(a, node.input[0])
    starts, ends = int_list(a, node, 1, "starts"), int_list(a, node, 2, "ends")
    axes, steps = int_list(a, node, 3, "axes"), int_list(a, node, 4, "steps")
    if entries is None or starts is None or ends is None or len(starts) != 1 or (axes and axes[0] != 0) or (
            steps and steps[0] != 1):
        release(a, node, idx)
        return
    a.dims[node.output[0]] = entries[starts[0]:ends[0]]


def concat(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Concat on axis 0 of integer vectors (tracked or constant)."""
    parts = [_entries(a, name) for name in node.input]
    if any(p is None for p in parts) or int(attr(node, "axis", 0)) != 0:  # type: ignore[arg-type]
        release(a, node, idx)
        return
    a.dims[node.output[0]] = [e for p in parts for e in p]  # type: ignore[union-attr]


def release(a: Analysis, node: onnx.NodeProto, idx: int, allowed: tuple[int, int, str] | None = None) -> None:
    """A use analysis does not follow: freeze every tensor whose channel count an input vector holds, except the
    one ``allowed`` use ``(input position, entry index, tensor)``."""
    for pos, name in enumerate(node.input):
        for j, entry in enumerate(a.dims.get(name, ())):
            if isinstance(entry, tuple) and entry[1] == 1 and (pos, j, entry[0]) != allowed:
                a.freeze(entry[0], f"channel count of '{entry[0]}' used by {describe(node, idx)}")


def channel_entry_ok(a: Analysis, node: onnx.NodeProto, pos: int, x: str) -> list[Dim] | None:
    """Entries of input ``pos`` when every reference to a channel count in it is ``(x, 1)`` at entry 1."""
    entries = _entries(a, node.input[pos]) if pos < len(node.input) and node.input[pos] else None
    if entries is None:
        return None
    channel_refs = [(j, e) for j, e in enumerate(entries) if isinstance(e, tuple) and e[1] == 1]
    return entries if all(j == 1 and e[0] == x for j, e in channel_refs) else None


SHAPE_RULES: dict[str, ShapeRule] = {
    "Shape": shape,
    "Gather": gather,
    "Slice": slice_,
    "Concat": concat,
    **dict.fromkeys(("Unsqueeze", "Squeeze", "Cast", "Identity"), same),
}
"""op_type -> rule propagating integer shape vectors; any other reader of a tracked vector goes through
:func:`release` (the channel rules of Resize and Reshape accept their own channel count first)."""


_OWN_COUNT = {"Resize": 3, "Reshape": 1}  # input position whose entry 1 may be the data input's own channel count


def track_shapes(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """Shape arithmetic of one node (see the module docstring); True when the node was handled here."""
    if node.op_type == "Shape":
        shape(a, node, idx)
        return True
    if not any(name in a.dims for name in node.input):
        return False
    rule = SHAPE_RULES.get(node.op_type)
    if rule is not None and not any(a.lay(name) for name in node.input):
        rule(a, node, idx)
        return True
    pos = _OWN_COUNT.get(node.op_type)
    release(a, node, idx, None if pos is None else (pos, 1, node.input[0]))
    return False

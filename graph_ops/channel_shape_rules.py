"""Shape arithmetic that reads a channel count: which uses stay exact after pruning, which freeze.

Exporters compute sizes at run time from ``Shape`` (a dynamic batch keeps them from folding): ``F.interpolate(g,
size=...)`` becomes ``Resize(g, sizes=Concat(Slice(Shape(g), 0, 2), [H, W]))``, a detection head's
``x.view(n, C, -1)`` reads ``n`` from ``Gather(Shape(x), 0)``, TF "same" padding computes ``Pad``'s pads from the
input's height and width. After pruning, ``Shape`` returns the pruned width, so an integer tensor that holds the
channel count of a tensor ``t`` is consistent exactly where that count is used as the channel count of ``t`` itself
again. Analysis therefore tracks small integer tensors entry by entry (``Analysis.dims``, row-major; their shapes are
analysis's static shapes): an entry is ``(t, axis)`` (dimension ``axis`` of tensor ``t``), an integer, or ``None``
(a value computed from batch or spatial sizes: unknown, but never a channel count).

* ``Shape`` (with ``start`` / ``end``) creates entries; ``Gather`` and ``Slice`` (constant indices, bounds, any axis
  and step), ``Concat``, ``Transpose``, ``Reshape`` / ``Flatten`` / ``Unsqueeze`` / ``Squeeze`` / ``Cast`` /
  ``Identity`` move them (``SHAPE_RULES``); arithmetic (``Add``, ``Div``, ``Ceil``, ``Max`` ...) of entries that hold
  no channel count gives ``None`` entries; ``ConstantOfShape`` repeats its value.
* ``Resize`` sizes and ``Reshape`` shapes may hold ``(x, 1)`` at entry 1 when ``x`` is the op's own data input
  (the channel count follows the pruned width; :mod:`graph_ops.channel_rules` and
  :mod:`graph_ops.channel_layout_rules` check this); ``Pad``'s pads must be the integer 0 on the batch and channel
  axes.
* Any other use of an entry ``(t, 1)`` (arithmetic, ``Expand``, ``Range``, a ``Reshape`` of another tensor, a
  graph output) freezes the channels of ``t``: the graph would compute with the pruned count in a way analysis does
  not follow (fail closed). Entries for other axes (batch, spatial) do not change under pruning and flow freely.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx.numpy_helper

from graph_ops.channel_state import Analysis, Dim, attr, describe, int_list

ShapeRule = Callable[[Analysis, onnx.NodeProto, int], bool]

MAX_ENTRIES = 64
"""Integer tensors of at most this many entries are tracked (shape vectors, pads, sizes; never activations)."""


def tracked(a: Analysis, name: str) -> list[Dim] | None:
    """Tracked entries of an integer tensor (row-major): from ``Analysis.dims`` or a small integer constant."""
    if name in a.dims:
        return a.dims[name]
    value = a.const(name)
    if value is not None and value.dtype.kind in "iu" and value.size <= MAX_ENTRIES:
        return [int(v) for v in value.ravel()]
    return None


def _array(a: Analysis, name: str) -> np.ndarray | None:
    """Tracked entries as an object array of the tensor's shape (recorded when tracked, a constant's, or the static
    shape analysis saw); None when the shape is not known for sure."""
    entries = tracked(a, name)
    if entries is None:
        return None
    shape = a.dim_shapes.get(name)
    if shape is None:
        shape = tuple(a.constants[name].dims) if a.is_const(name) else a.shapes.get(name)
    if shape is None or None in shape or math.prod(shape) != len(entries):
        return None
    arr = np.empty(len(entries), dtype=object)
    for i, entry in enumerate(entries):  # element by element: an entry may be a tuple
        arr[i] = entry
    return arr.reshape(shape)


def _store(a: Analysis, name: str, arr: np.ndarray | object) -> bool:
    if not isinstance(arr, np.ndarray):  # numpy hands a single object entry back as itself
        scalar = np.empty((), dtype=object)
        scalar[()] = arr
        arr = scalar
    if arr.size > MAX_ENTRIES:
        return False
    a.dims[name] = list(arr.ravel())
    a.dim_shapes[name] = tuple(arr.shape)
    return True


def _channel_refs(entries: list[Dim] | None) -> bool:
    return any(isinstance(e, tuple) and e[1] == 1 for e in entries or ())


def shape(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """Shape(x)[start:end]: entries ``(x, axis)``."""
    rank = a.rank(node.input[0])
    if rank is None:
        return True
    if node.input[0] in a.last_axis or node.input[0] in a.branched:  # the rules follow channel counts on axis 1
        a.freeze(node.input[0], f"Shape of a tensor with channels off axis 1 at {describe(node, idx)}")
    start, end = int(attr(node, "start", 0)), attr(node, "end", None)  # type: ignore[arg-type]
    axes = list(range(rank))[start:end if end is None else int(end)]  # type: ignore[call-overload]
    a.dims[node.output[0]] = [(node.input[0], ax) for ax in axes]
    a.dim_shapes[node.output[0]] = (len(axes),)
    return True


def _to_shape(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """Reshape / Flatten / Unsqueeze / Squeeze / Cast / Identity of an integer tensor: the same entries."""
    entries, shape = tracked(a, node.input[0]), a.shapes.get(node.output[0])
    if entries is None:
        return False
    a.dims[node.output[0]] = list(entries)
    a.dim_shapes.pop(node.output[0], None)
    if shape is not None and None not in shape and math.prod(shape) == len(entries):  # type: ignore[arg-type]
        a.dim_shapes[node.output[0]] = shape  # type: ignore[assignment]
    return True


def gather(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """Gather with constant indices, any axis."""
    arr, indices = _array(a, node.input[0]), a.const(node.input[1])
    if arr is None or indices is None or arr.ndim == 0:
        return False
    return _store(a, node.output[0], np.take(arr, indices.astype(np.int64), axis=int(attr(node, "axis", 0))))


def slice_(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """Slice with constant bounds, axes and steps (ONNX clamps bounds as Python does)."""
    arr = _array(a, node.input[0])
    starts, ends = int_list(a, node, 1, "starts"), int_list(a, node, 2, "ends")
    axes, steps = int_list(a, node, 3, "axes"), int_list(a, node, 4, "steps")
    if arr is None or starts is None or ends is None or arr.ndim == 0:
        return False
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * arr.ndim
    for axis, lo, hi, step in zip(axes, starts, ends, steps, strict=True):
        if step == 0:
            return False
        index[axis % arr.ndim] = slice(lo, hi, step)
    return _store(a, node.output[0], arr[tuple(index)])


def concat(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """Concat of integer tensors (tracked or constant) on any axis."""
    parts = [_array(a, name) for name in node.input]
    if any(p is None or p.ndim == 0 for p in parts):
        return False
    return _store(a, node.output[0], np.concatenate(parts, axis=int(attr(node, "axis", 0))))  # type: ignore[arg-type]


def transpose(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """Transpose of a tracked integer tensor."""
    arr = _array(a, node.input[0])
    if arr is None:
        return False
    perm = attr(node, "perm")
    return _store(a, node.output[0], np.transpose(arr, None if perm is None else list(perm)))  # type: ignore[arg-type]


def arithmetic(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """Elementwise arithmetic of tracked or constant tensors without a channel count: unknown (``None``) entries
    of the broadcast shape; a channel count in an operand is not followed (released by the caller)."""
    shapes = []
    for name in (n for n in node.input if n):
        arr = _array(a, name) if name in a.dims else None
        if arr is None and not a.is_const(name):  # an activation, or a tracked tensor of unknown shape
            return False
        if _channel_refs(tracked(a, name)):
            return False
        shapes.append(arr.shape if arr is not None else tuple(a.constants[name].dims))
    try:
        out = np.broadcast_shapes(*shapes)
    except ValueError:
        return False
    return _store(a, node.output[0], np.full(out, None, dtype=object))


def constant_of_shape(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """ConstantOfShape of a tracked shape: its (integer) value repeated, when the output shape is static."""
    out = a.shapes.get(node.output[0])
    value = attr(node, "value")
    fill = onnx.numpy_helper.to_array(value).ravel() if value is not None else np.zeros(1, np.float32)
    if out is None or None in out or fill.dtype.kind not in "iu" or _channel_refs(tracked(a, node.input[0])):
        return False
    return _store(a, node.output[0], np.full(out, int(fill[0]), dtype=object))


def release(a: Analysis, node: onnx.NodeProto, idx: int, allowed: tuple[int, int, str] | None = None) -> None:
    """A use analysis does not follow: freeze every tensor whose channel count an input vector holds, except the
    one ``allowed`` use ``(input position, entry index, tensor)``."""
    for pos, name in enumerate(node.input):
        for j, entry in enumerate(a.dims.get(name, ())):
            if isinstance(entry, tuple) and entry[1] == 1 and (pos, j, entry[0]) != allowed:
                a.freeze(entry[0], f"channel count of '{entry[0]}' used by {describe(node, idx)}")


def channel_entry_ok(a: Analysis, node: onnx.NodeProto, pos: int, x: str) -> list[Dim] | None:
    """Entries of input ``pos`` when every reference to a channel count in it is ``(x, 1)`` at entry 1."""
    entries = tracked(a, node.input[pos]) if pos < len(node.input) and node.input[pos] else None
    if entries is None:
        return None
    channel_refs = [(j, e) for j, e in enumerate(entries) if isinstance(e, tuple) and e[1] == 1]
    return entries if all(j == 1 and e[0] == x for j, e in channel_refs) else None


_ARITHMETIC = ("Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Pow", "Neg", "Abs", "Ceil", "Floor", "Round",
               "Clip", "Sqrt", "Relu", "Sign")

SHAPE_RULES: dict[str, ShapeRule] = {
    "Shape": shape,
    "Gather": gather,
    "Slice": slice_,
    "Concat": concat,
    "Transpose": transpose,
    "ConstantOfShape": constant_of_shape,
    **dict.fromkeys(("Reshape", "Flatten", "Unsqueeze", "Squeeze", "Cast", "Identity"), _to_shape),
    **dict.fromkeys(_ARITHMETIC, arithmetic),
}
"""op_type -> rule propagating tracked integer tensors (True: tracked); any other reader of a tracked tensor, or a
rule that cannot follow it, goes through :func:`release` (the channel rules of Resize and Reshape accept their own
channel count first)."""


_OWN_COUNT = {"Resize": 3, "Reshape": 1}  # input position whose entry 1 may be the data input's own channel count


def track_shapes(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """Shape arithmetic of one node (see the module docstring); True when the node was handled here."""
    if node.op_type == "Shape":
        return shape(a, node, idx)
    if not any(name in a.dims for name in node.input):
        return False
    rule = SHAPE_RULES.get(node.op_type)
    if rule is not None and not any(a.lay(name) for name in node.input) and (node.input[0] in a.dims or node.input[0] in a.constants) \
            and rule(a, node, idx):
        return True
    pos = _OWN_COUNT.get(node.op_type)
    release(a, node, idx, None if pos is None else (pos, 1, node.input[0]))
    return False

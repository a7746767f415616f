"""Layer-by-layer data passes shared by the recovery methods (:mod:`pipeline.recover`, :mod:`pipeline.refit`).

Recovery fits each rewritten layer on data streamed through two models at once: the ORIGINAL model (targets: what
the layer should reproduce) and the CURRENT, partly recovered pruned model (inputs: what the layer really sees once
the layers before it were pruned and refit). :func:`stream_pairs` runs both on the same batches with the needed
tensors exposed as extra outputs (activations are never stored; callers fold each batch into float64 moments), and
marks every ``HOLD_OUT_EVERY``-th batch as held out (for choosing ridge factors). :func:`layer_levels` orders the
layers for sequential processing: a layer's level is the number of other layers on the longest path above it, so
one data pass per level sees every upstream layer already rewritten (error-accumulation correction, He et al. 2017).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from graph_ops.channels import node_name
from graph_ops.errors import PreconditionError
from graph_ops.probes import expose_tensors
from pipeline.errors import CalibrationError

HOLD_OUT_EVERY = 5  # batch i is held out when i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
MIN_ROWS_PER_DIM = 10  # methods.md 6.2: at least 10x more samples than a regression's dimension (else a warning)


def _run(session: Any, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    try:
        outputs = session.run(list(names), dict(feeds))
    except Exception as err:  # onnxruntime raises its own exception types
        raise CalibrationError(f"onnxruntime failed while collecting recovery statistics: {err}") from err
    for name, value in zip(names, outputs, strict=True):
        if not np.all(np.isfinite(value)):
            raise CalibrationError(f"tensor '{name}' has NaN/Inf values on the recovery data")
    return outputs


def stream_pairs(original: onnx.ModelProto, original_names: Sequence[str], current: onnx.ModelProto | None,
                 current_names: Sequence[str], dataset: Any, *, batch_size: int = 64, backend: str = "auto",
                 intra_op_threads: int | None = None) -> Iterator[tuple[bool, list[np.ndarray], list[np.ndarray]]]:
    """Yield ``(held_out, original tensors, current tensors)`` per batch of ``dataset``.

    Args:
        original: the unpruned (canonical) model; its inputs define how the dataset is bound.
        original_names: tensors of ``original`` to return (in order).
        current: the partly recovered pruned model, or None (then the current tensors are empty lists).
        current_names: tensors of ``current`` to return.
        dataset: a :class:`pipeline.data.Dataset` (labels are ignored).

    Raises:
        CalibrationError: no samples, data that does not fit the model, or NaN/Inf activations.
    """
    from pipeline.calibrate import model_input_specs, open_session
    from pipeline.data import validate_batch

    session = open_session(expose_tensors(original, original_names).SerializeToString(), backend, intra_op_threads)
    other = None
    if current is not None and current_names:
        other = open_session(expose_tensors(current, current_names).SerializeToString(), backend, intra_op_threads)
    specs = model_input_specs(original)
    samples = 0
    for i, (feeds, _) in enumerate(dataset.bind(list(specs)).batches(batch_size)):
        validate_batch(feeds, specs, f"dataset '{dataset.name}'")
        outs = _run(session, original_names, feeds)
        cur = _run(other, current_names, feeds) if other is not None else []
        samples += next(iter(feeds.values())).shape[0]
        yield i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1, outs, cur
    if samples == 0:
        raise CalibrationError("the recovery dataset yielded no samples")


def layer_levels(model: onnx.ModelProto, indices: Sequence[int]) -> list[int]:
    """Per layer (node index in ``model``), how many other listed layers lie upstream of its input on the longest
    path (graph order is topological)."""
    wanted = set(indices)
    depth: dict[str, int] = {}
    level: dict[int, int] = {}
    for idx, node in enumerate(model.graph.node):
        here = max((depth.get(name, 0) for name in node.input if name), default=0)
        if idx in wanted:
            level[idx] = here
            here += 1
        for name in node.output:
            depth[name] = here
    return [level[i] for i in indices]


def level_progress(levels: Sequence[int], progress: bool) -> Iterator[int]:
    """The distinct levels in order, with a tqdm bar on stderr when ``progress`` (one data pass per level)."""
    import sys

    from tqdm import tqdm

    yield from tqdm(sorted(set(levels)), desc="recover", unit="level", file=sys.stderr, disable=not progress)


def node_by_name(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    """The node called ``name`` (unnamed nodes: ``<op_type>_<index>``).

    Raises:
        PreconditionError: no such node.
    """
    for idx, node in enumerate(model.graph.node):
        if node_name(node, idx) == name:
            return node
    raise PreconditionError(f"pruned model has no node '{name}'; pass the model apply_plan returned")

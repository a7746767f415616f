"""Running graph passes: one onnx-graphsurgeon graph, cleanup and toposort between passes, checks at the end.

A *pass* is a function ``name(graph: gs.Graph, /) -> PassResult``. It mutates the graph in place and neither calls
``cleanup()`` nor ``toposort()``; :func:`run_passes` does both after every pass. A pattern that does not apply is
recorded in ``PassResult.notes``; a broken precondition raises
:class:`~graph_ops.errors.PreconditionError`. Any exception inside a pass becomes a
:class:`~graph_ops.errors.PassError` naming the pass and the passes that ran before it.

After the last pass :func:`run_passes` exports the graph, drops every ``value_info`` (they go stale after rewrites;
the dynamo exporter writes many), re-runs strict ONNX shape inference with data propagation and, unless told not
to, runs the full ONNX checker. The input ``ModelProto`` is never modified.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from graph_ops.errors import PassError, UnsupportedModelError, VerificationError
from graph_ops.io import verify_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    """What a pass did.

    Attributes:
        modified: True when the graph changed.
        notes: readable remarks, e.g. patterns that were found but left alone and why.
    """

    modified: bool
    notes: tuple[str, ...] = ()


GraphPass = Callable[[gs.Graph], PassResult]

MIN_IR_VERSION = 4  # the first IR version that allows initializers which are not graph inputs


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of a model (passes and shape inference never touch the caller's proto)."""
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone


def infer_shapes(model: onnx.ModelProto, *, strict: bool) -> onnx.ModelProto:
    """Drop all ``value_info`` and re-run ONNX shape inference (with data propagation) on a copy.

    Args:
        model: the model; not modified.
        strict: raise on any inference error (the final check); otherwise return what could be inferred.

    Returns:
        A new model with fresh ``value_info``.
    """
    clone = copy_model(model)
    del clone.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(clone, strict_mode=strict, data_prop=True)
    except Exception as err:  # onnx raises InferenceError, ValueError, RuntimeError
        if strict:
            raise VerificationError(f"strict shape inference failed after the passes: {err}") from err
        logger.debug("shape inference incomplete before passes: %s", err)
        return clone


def graph_from_model(model: onnx.ModelProto) -> gs.Graph:
    """Import a model into onnx-graphsurgeon with inferred shapes (the caller's proto is not modified)."""
    try:
        return gs.import_onnx(infer_shapes(model, strict=False))
    except Exception as err:
        raise UnsupportedModelError(f"onnx-graphsurgeon cannot import the model: {err}") from err


def model_from_graph(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graph, keeping the template's opsets, producer and metadata, and its IR version (at least 4).

    IR versions below 4 require every initializer to be listed as a graph input, which the constants the passes
    create are not; such models are raised to IR 4 (:data:`MIN_IR_VERSION`, whose semantics include IR 3's). As for
    any IR version, the export lists only the non-constant graph inputs: an initializer that was also an input (the
    IR 3 way to store weights, overridable in principle) becomes a plain constant, its value unchanged.
    """
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = max(template.ir_version, MIN_IR_VERSION)
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    return model


def run_passes(
    model: onnx.ModelProto,
    names: Sequence[str],
    *,
    verify: bool = True,
    registry: Mapping[str, GraphPass],
) -> onnx.ModelProto:
    """Run registered passes in order on a copy of ``model``.

    Args:
        model: the input model (with its external data loaded); never modified.
        names: pass names, keys of ``registry``.
        verify: run the full ONNX checker on the result.
        registry: the pass table (``graph_ops.canonicalize.PASSES``, or a test's own).

    Returns:
        The rewritten model with freshly inferred shapes.

    Raises:
        PassError: a pass failed (the message names it and the passes before it).
        VerificationError: strict shape inference or the checker rejected the result.
    """
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise PassError(unknown[0], (), f"unknown pass; known passes: {', '.join(sorted(registry))}")
    graph = graph_from_model(model)
    done: list[str] = []
    for name in names:
        before = len(graph.nodes)
        try:
            result = registry[name](graph)
            graph.cleanup().toposort()
        except Exception as err:
            raise PassError(name, tuple(done), f"{type(err).__name__}: {err}") from err
        logger.debug("pass %s: %d -> %d nodes%s", name, before, len(graph.nodes), "" if result.modified else " (no change)")
        for note in result.notes:
            logger.debug("pass %s: %s", name, note)
        done.append(name)
    out = infer_shapes(model_from_graph(graph, model), strict=True)
    if verify:
        verify_model(out)
    return out

"""The spine of a run: a model file loaded, canonicalized and analysed once, then handed to every stage.

:func:`prepare` reads the file (clear errors for every way it can be wrong), hashes it (the identity plans and
statistics record), canonicalizes it (:func:`graph_ops.canonicalize.canonicalize`: the only two shape inferences of
a run happen there) and analyses the canonical graph with the shapes canonicalization just inferred. The resulting
:class:`PreparedModel` carries the analysis (:class:`~graph_ops.groups.ChannelGroupIndex`: groups, the edits a plan
implies, static shapes, the graph's fingerprint), so surgery, the mask oracle, recovery, the cost counter and the
scorers never analyse or infer shapes again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from graph_ops.canonical_passes import fold_shape_chains
from graph_ops.canonicalize import canonicalize
from graph_ops.channels import analyze, producer_weights
from graph_ops.cost import CostReport, count
from graph_ops.groups import ChannelGroupIndex
from graph_ops.io import check_finite_weights, load_model, sha256_file
from graph_ops.proto import declared_shapes, named_input_shapes, node_name, with_input_shapes
from pipeline.errors import UserInputError
from pipeline.scorers.base import Layer
from pipeline.task import Task


@dataclass(frozen=True)
class PreparedModel:
    """A model loaded once: its file identity, its canonical graph and its analysis.

    Attributes:
        path: the model file (never modified).
        sha256: sha256 of the file's bytes.
        model: the canonical model (what analysis, calibration, surgery and recovery work on).
        index: ``analyze(model)``: channel groups, edits, static shapes, fingerprint.
        input_shapes: the static input dims the model was prepared with (empty: as in the file).
        task: the task whose head the canonical model carries (:mod:`pipeline.task`), or None.
    """

    path: Path
    sha256: str
    model: onnx.ModelProto
    index: ChannelGroupIndex
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    task: Task | None = None

    def weights(self) -> dict[str, np.ndarray]:
        """Initializers as numpy arrays (for the data-free scorers)."""
        return {init.name: numpy_helper.to_array(init) for init in self.model.graph.initializer}

    @cached_property
    def cost(self) -> CostReport:
        """MACs and params of the canonical model (counted once, on the analysis's shapes)."""
        return count(self.model, self.index.shapes)

    @cached_property
    def producer_weights(self) -> dict[str, tuple[str, int, str]]:
        """Producer node -> (weight initializer, output-channel axis, layout tensor), read off the analysis's edits."""
        return producer_weights(self.model, self.index)

    @cached_property
    def layers(self) -> tuple[Layer, ...]:
        """Every layer that reads channels (its consumer edit of the weight), topological order."""
        found = []
        for edit in self.index.edits:
            if edit.role == "consumer" and edit.kind == "take" and edit.pos == 1:
                node = self.model.graph.node[edit.node]
                found.append(Layer(node_name(node, edit.node), node.input[1], edit.axis, edit.block, edit.tensor,
                                   node.output[0]))
        return tuple(found)

    @property
    def probes(self) -> tuple[str, ...]:
        """All probes of all prunable groups, in topological group order, without repeats."""
        return default_probes(self.index)


def default_probes(index: ChannelGroupIndex) -> tuple[str, ...]:
    """All probes of all prunable groups of an analysis, in topological group order, without repeats."""
    return tuple(dict.fromkeys(p for group in index.groups if group.prunable for p in group.probes))


InputShapes = Mapping[str, tuple[int, ...]]


def parse_input_shapes(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """``["images:1x3x640x640", ...]`` (the CLI's repeatable ``--input-shape [NAME:]DIMS``) ->
    ``{"images": (1, 3, 640, 640)}``; DIMS without a name is the model's single input (key ``""``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition(":")
        try:
            values = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            values = ()
        if (sep and not name) or not values or min(values) < 1:
            raise UserInputError(f"--input-shape {spec!r}: expected [NAME:]DIMS with positive dims, e.g. "
                                 f"images:1x3x640x640 (or 1x3x640x640 for a single-input model)")
        if name in shapes:
            raise UserInputError(f"--input-shape names input '{name or '(the single input)'}' twice")
        shapes[name] = values
    return shapes


def prepare(path: str | os.PathLike[str], input_shapes: InputShapes | None = None, *,
            task: Task | None = None) -> PreparedModel:
    """Load, hash, canonicalize and analyse a model file (see the module docstring); with a ``task``, the model's
    first output is rewritten into the task's scores first (:meth:`pipeline.task.Task.head`).

    Args:
        path: the model file (never modified).
        input_shapes: static dims for graph inputs (``{"images": (1, 3, 640, 640)}``), written into the model before
            canonicalization, so that shape inference, the cost model, calibration and the pruned model use them
            (the pruned model keeps them: it is specialised to these input sizes).
        task: a task (:mod:`pipeline.task`) whose head replaces the first output (after the input shapes).

    Raises:
        UserInputError: a missing or unreadable file, an input shape that does not fit the model, or a task that
            does not fit the model's output.
        PassError, VerificationError: canonicalization failed (the message names the pass).
    """
    path = Path(path)
    model = load_model(path)
    check_finite_weights(model, path)
    sha = sha256_file(path)
    if input_shapes:
        input_shapes = named_input_shapes(model, input_shapes)
        model = fold_shape_chains(with_input_shapes(model, input_shapes))
    if task is not None:
        model = task.head(model)
    canonical = canonicalize(model)
    return PreparedModel(path=path, sha256=sha, model=canonical, index=analyze(canonical, declared_shapes(canonical)),
                         input_shapes=dict(input_shapes or {}), task=task)


def as_prepared(model: PreparedModel | str | os.PathLike[str], input_shapes: InputShapes | None = None, *,
                task: Task | None = None) -> PreparedModel:
    """A prepared model as it is (its task must be ``task`` when one is given), or a model file prepared (with
    ``input_shapes`` and ``task``)."""
    if not isinstance(model, PreparedModel):
        return prepare(model, input_shapes, task=task)
    if task is not None and model.task != task:
        raise UserInputError(f"the prepared model carries task {model.task and model.task.to_dict()}, not "
                             f"{task.to_dict()}; prepare it with the task")
    return model

"""Accuracy of a classifier on held-out data, and its agreement with a reference model.

The model's first output must be class scores ``(N, K)``. Over all samples of the dataset:

* ``top1`` = fraction with ``argmax(logits) == label`` (numpy's argmax: the first maximum wins a tie);
* ``top5`` (only when ``K > 5``) = fraction whose label is among the five largest scores, i.e. fewer than five
  scores are strictly greater than the label's score (a tie at the boundary counts in the label's favour);
* with a reference model: ``agreement`` = fraction with identical argmax, and ``relative_logit_error`` =
  ``||a - b|| / ||b||`` (Frobenius norms) accumulated over *all* outputs of both models and all samples, with ``a``
  the model's and ``b`` the reference's outputs (both models must have the same outputs).

Accumulation is in float64 across batches, so memory does not grow with the dataset. Accuracy needs labels; without
labels ``top1``/``top5`` are None (agreement with a reference still works).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from pipeline.errors import CalibrationError, UserInputError
from pipeline.runtime import check_labels, model_input_specs, open_session, run, stream
from pipeline.task import Task

TOP_K = 5


@dataclass(frozen=True)
class EvalReport:
    """Evaluation result (fractions in [0, 1]; None when not measured)."""

    n: int
    top1: float | None
    top5: float | None
    agreement: float | None = None
    relative_logit_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with every field."""
        return asdict(self)


def _as_model(model: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    from graph_ops.io import load_model

    return load_model(model)


def _num_classes(model: onnx.ModelProto) -> int:
    out = model.graph.output[0]
    dims = out.type.tensor_type.shape.dim
    if len(dims) != 2:
        raise UserInputError(f"evaluation needs class scores (N, K) as the first output; '{out.name}' has rank "
                             f"{len(dims)}")
    return int(dims[1].dim_value) if dims[1].HasField("dim_value") else 0


def _check_same_inputs(model: dict[str, Any], reference: dict[str, Any]) -> None:
    """The reference must take the same inputs (names and ranks) as the model, fed the same batches."""
    ranks = {name: len(shape) for name, (shape, _) in model.items()}
    ref_ranks = {name: len(shape) for name, (shape, _) in reference.items()}
    if ranks != ref_ranks:
        raise UserInputError(f"the reference model takes inputs {ref_ranks} (name: rank) but the model takes {ranks}; "
                             "compare a pruned model with the original it was pruned from (same inputs)")


def _top_counts(logits: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """Numbers of top-1 and top-5 hits in one batch."""
    top1 = int((logits.argmax(axis=1) == labels).sum())
    label_scores = logits[np.arange(len(labels)), labels]
    higher = (logits > label_scores[:, None]).sum(axis=1)
    return top1, int((higher < TOP_K).sum())


@dataclass
class _Totals:
    """Running sums of one evaluation (internal, mutated only inside :func:`evaluate`)."""

    n: int = 0
    labelled: int = 0
    top1: int = 0
    top5: int = 0
    agree: int = 0
    diff_sq: float = 0.0
    ref_sq: float = 0.0

    def add_labels(self, logits: np.ndarray, labels: np.ndarray) -> None:
        top1, top5 = _top_counts(logits, labels)
        self.top1, self.top5, self.labelled = self.top1 + top1, self.top5 + top5, self.labelled + len(labels)

    def add_reference(self, outputs: list[np.ndarray], ref_outputs: list[np.ndarray]) -> None:
        if [a.shape for a in outputs] != [b.shape for b in ref_outputs]:
            raise UserInputError(f"model and reference outputs differ: {[a.shape for a in outputs]} vs "
                                 f"{[b.shape for b in ref_outputs]}")
        self.agree += int((outputs[0].argmax(axis=1) == ref_outputs[0].argmax(axis=1)).sum())
        for a, b in zip(outputs, ref_outputs, strict=True):
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            self.diff_sq += float(np.square(a64 - b64).sum())
            self.ref_sq += float(np.square(b64).sum())


def _report(totals: _Totals, num_classes: int, with_reference: bool) -> EvalReport:
    if totals.n == 0:
        raise CalibrationError("the evaluation dataset yielded no samples")
    labelled = totals.labelled == totals.n
    error = None
    if with_reference:
        error = float(np.sqrt(totals.diff_sq) / np.sqrt(totals.ref_sq)) if totals.ref_sq > 0 else float(
            np.sqrt(totals.diff_sq))
    return EvalReport(n=totals.n, top1=totals.top1 / totals.n if labelled else None,
                      top5=totals.top5 / totals.n if labelled and num_classes > TOP_K else None,
                      agreement=totals.agree / totals.n if with_reference else None, relative_logit_error=error)


def evaluate(model: str | os.PathLike[str] | onnx.ModelProto, dataset: Any, *,
             reference: str | os.PathLike[str] | onnx.ModelProto | None = None, batch_size: int = 256,
             backend: str = "auto", intra_op_threads: int | None = None, progress: bool = False,
             task: Task | None = None) -> EvalReport:
    """Top-1/top-5 accuracy of ``model`` on ``dataset``; agreement and logit error against ``reference``.

    Args:
        model: an .onnx path or a ModelProto; its first output must be ``(N, K)`` class scores.
        dataset: a :class:`pipeline.data.Dataset` (``batches(batch_size)`` yields ``(feeds, labels)``).
        reference: optional model (path or ModelProto) with the same inputs and outputs, e.g. the unpruned one.
        batch_size: samples per onnxruntime call.
        backend: ``auto`` (CUDA EP when really active, else CPU), ``ort-cpu`` or ``ort-cuda``.
        intra_op_threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        progress: show a tqdm bar on stderr.
        task: evaluate on the user's task (:mod:`pipeline.task`): the models get the task's head unless they carry
            it already (a model pruned for the task), and the dataset keeps the task's samples with task labels.

    Returns:
        The :class:`EvalReport`.
    """
    if dataset is None:
        raise UserInputError("evaluation needs data: give a dataset (e.g. --data mnist)")
    proto = _as_model(model)
    if task is not None:
        proto = task.head(proto)
        reference = None if reference is None else task.head(_as_model(reference))
        dataset = task.dataset(dataset).data
    num_classes = _num_classes(proto)
    specs = model_input_specs(proto)
    session = open_session(proto.SerializeToString(), backend, intra_op_threads)
    ref_session = None
    if reference is not None:
        ref_proto = _as_model(reference)
        _check_same_inputs(specs, model_input_specs(ref_proto))
        ref_session = open_session(ref_proto.SerializeToString(), backend, intra_op_threads)
    totals = _Totals()
    width = num_classes
    for batch in stream(session, dataset, None, specs, batch_size=batch_size, stage="evaluate", progress=progress):
        logits = batch.outputs[0]
        width = num_classes or logits.shape[1]
        if batch.labels is not None:
            totals.add_labels(logits, check_labels(batch.labels, batch.size, width))
        if ref_session is not None:
            totals.add_reference(batch.outputs, run(ref_session, None, batch.feeds, stage="evaluate"))
        totals.n += batch.size
    return _report(totals, width, ref_session is not None)

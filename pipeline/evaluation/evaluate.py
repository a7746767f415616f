"""Accuracy of a classifier on held-out data, and the fidelity of a model's outputs to a reference model.

Classifier metrics (the model's first output is class scores ``(N, K)``), over all samples of the dataset:

* ``top1`` = fraction with ``argmax(logits) == label`` (numpy's argmax: the first maximum wins a tie);
* ``top5`` (only when ``K > 5``) = fraction whose label is among the five largest scores, i.e. fewer than five
  scores are strictly greater than the label's score (a tie at the boundary counts in the label's favour);
* with a reference model: ``agreement`` = fraction with identical argmax, and ``relative_logit_error`` =
  ``||a - b|| / ||b||`` (Frobenius norms) accumulated over *all* outputs of both models and all samples, with ``a``
  the model's and ``b`` the reference's outputs.

Output fidelity (any model, e.g. a detector, with a reference; both models must have the same outputs): per output
``o``, over all samples, ``relative_error = ||a_o - b_o|| / ||b_o||``, ``cosine = <a_o, b_o> / (||a_o|| ||b_o||)``
(the outputs flattened; 1.0 when both are zero) and ``max_abs_diff = max |a_o - b_o|``.

Dense outputs (a CTC sequence ``[N, T, K]``, a map ``[N, K, H, W]``, YOLO detections ``[N, 4 + K, A]``; detected by
:func:`pipeline.data.outputs.detect_output_kind` or given as ``output_kind``): ``metrics`` holds the dense metrics of
:mod:`pipeline.evaluation.dense_eval` (exact-sequence accuracy and CER, mIoU and pixel accuracy, mAP@0.5 and mAP@0.5:0.95),
against the data's dense labels, else against the reference model's own decisions (``metrics["against"]`` says
which), with ``metrics["primary"]`` naming the score (``exact``, ``miou``, ``map50``; :func:`score`).

Accumulation is in float64 across batches, so memory does not grow with the dataset. Accuracy needs labels; without
labels ``top1``/``top5`` are None. A model that is neither a classifier nor scored by a dense metric can only be
evaluated against a reference.
Non-finite outputs (NaN or infinity, of the model or of the reference) are refused with an error naming the output:
NaN logits would otherwise score top-5 = 1.0 (no score is greater than NaN), a silently wrong result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from pipeline.data.outputs import DecodeOptions, output_classes
from pipeline.data.task import Task
from pipeline.errors import CalibrationError, UserInputError
from pipeline.evaluation.dense_eval import DenseScorer, dense_kind, dense_scorer
from pipeline.model.runtime import check_labels, model_input_specs, open_session, run, samples_per_run, stream

logger = logging.getLogger(__name__)

TOP_K = 5


@dataclass(frozen=True)
class EvalReport:
    """Evaluation result (fractions in [0, 1]; None when not measured); ``outputs``: fidelity per output name."""

    n: int
    top1: float | None
    top5: float | None
    agreement: float | None = None
    relative_logit_error: float | None = None
    outputs: dict[str, dict[str, float]] | None = field(default=None)
    metrics: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with every field (``metrics`` only for a dense output)."""
        doc = asdict(self)
        if doc["metrics"] is None:
            del doc["metrics"]
        return doc


def score(evaluation: dict[str, Any]) -> tuple[str, float | None]:
    """``(name, value)`` of an evaluation's score (:meth:`EvalReport.to_dict`): a dense output's primary metric
    (``exact``, ``miou``, ``map50``), else ``top1``."""
    dense = evaluation.get("metrics")
    if dense:
        return dense["primary"], dense["score"]
    return "top1", evaluation.get("top1")


def _as_model(model: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    from graph_ops.io import check_finite_weights, load_model

    proto = load_model(model)
    check_finite_weights(proto, model)
    return proto


def _check_finite(names: list[str], outputs: list[np.ndarray], which: str) -> None:
    """Refuse NaN or infinite outputs (``which``: "the model" or "the reference")."""
    for name, value in zip(names, outputs, strict=False):
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise UserInputError(f"{which}'s output '{name}' has NaN or infinite values on this data, so no metric "
                                 "would mean anything; check the model's weights and the data's scale (--scale, "
                                 "--mean, --std)")


def is_classifier(model: onnx.ModelProto) -> bool:
    """True when the first output is rank 2 (class scores ``(N, K)``)."""
    return len(model.graph.output[0].type.tensor_type.shape.dim) == 2


def _num_classes(model: onnx.ModelProto) -> int:
    dims = model.graph.output[0].type.tensor_type.shape.dim
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
class _Fidelity:
    """Running sums of one output's fidelity (internal)."""

    diff_sq: float = 0.0
    ref_sq: float = 0.0
    own_sq: float = 0.0
    dot: float = 0.0
    max_abs: float = 0.0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        diff = a64 - b64
        self.diff_sq += float(diff @ diff)
        self.ref_sq += float(b64 @ b64)
        self.own_sq += float(a64 @ a64)
        self.dot += float(a64 @ b64)
        self.max_abs = max(self.max_abs, float(np.abs(diff).max()) if diff.size else 0.0)

    def report(self) -> dict[str, float]:
        norms = np.sqrt(self.own_sq * self.ref_sq)
        return {"relative_error": float(np.sqrt(self.diff_sq) / np.sqrt(self.ref_sq)) if self.ref_sq > 0 else float(
                    np.sqrt(self.diff_sq)),
                "cosine": float(self.dot / norms) if norms > 0 else float(self.own_sq == self.ref_sq),
                "max_abs_diff": self.max_abs}


@dataclass
class _Totals:
    """Running sums of one evaluation (internal, mutated only inside :func:`evaluate`)."""

    classifier: bool
    n: int = 0
    labelled: int = 0
    top1: int = 0
    top5: int = 0
    agree: int = 0
    fidelity: dict[str, _Fidelity] = field(default_factory=dict)

    def add_labels(self, logits: np.ndarray, labels: np.ndarray) -> None:
        top1, top5 = _top_counts(logits, labels)
        self.top1, self.top5, self.labelled = self.top1 + top1, self.top5 + top5, self.labelled + len(labels)

    def add_reference(self, names: list[str], outputs: list[np.ndarray], ref_outputs: list[np.ndarray]) -> None:
        if [a.shape for a in outputs] != [b.shape for b in ref_outputs]:
            raise UserInputError(f"model and reference outputs differ: {[a.shape for a in outputs]} vs "
                                 f"{[b.shape for b in ref_outputs]}")
        if self.classifier:
            self.agree += int((outputs[0].argmax(axis=1) == ref_outputs[0].argmax(axis=1)).sum())
        for name, a, b in zip(names, outputs, ref_outputs, strict=True):
            self.fidelity.setdefault(name, _Fidelity()).add(a, b)


def _report(totals: _Totals, num_classes: int, with_reference: bool, dense: DenseScorer | None = None) -> EvalReport:
    if totals.n == 0:
        raise CalibrationError("the evaluation dataset yielded no samples")
    labelled = totals.classifier and totals.labelled == totals.n
    error = outputs = None
    if with_reference:
        outputs = {name: f.report() for name, f in totals.fidelity.items()}
        diff, ref = (sum(getattr(f, k) for f in totals.fidelity.values()) for k in ("diff_sq", "ref_sq"))
        error = float(np.sqrt(diff) / np.sqrt(ref)) if ref > 0 else float(np.sqrt(diff))
    return EvalReport(n=totals.n, top1=totals.top1 / totals.n if labelled else None,
                      top5=totals.top5 / totals.n if labelled and num_classes > TOP_K else None,
                      agreement=totals.agree / totals.n if with_reference and totals.classifier else None,
                      relative_logit_error=error if totals.classifier else None, outputs=outputs,
                      metrics=None if dense is None else dense.result())


def evaluate(model: str | os.PathLike[str] | onnx.ModelProto, dataset: Any, *,
             reference: str | os.PathLike[str] | onnx.ModelProto | None = None, batch_size: int = 256,
             backend: str = "auto", intra_op_threads: int | None = None, progress: bool = False,
             task: Task | None = None, output_kind: str | None = None,
             decode: DecodeOptions | None = None) -> EvalReport:
    """Top-1/top-5 accuracy of a classifier, or the dense metrics of a dense output, on ``dataset``; agreement and
    output fidelity against ``reference``.

    Args:
        model: an .onnx path or a ModelProto.
        dataset: a :class:`pipeline.data.datasets.Dataset` (``batches(batch_size)`` yields ``(feeds, labels)``).
        reference: optional model (path or ModelProto) with the same inputs and outputs, e.g. the unpruned one;
            required when the model is not a classifier (its first output is not ``(N, K)``).
        batch_size: samples per onnxruntime call.
        backend: ``auto`` (CUDA EP when really active, else CPU), ``ort-cpu`` or ``ort-cuda``.
        intra_op_threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        progress: show a tqdm bar on stderr.
        task: evaluate on the user's task (:mod:`pipeline.data.task`): the models get the task's head unless they carry
            it already (a model pruned for the task), and the dataset keeps the task's samples with task labels.
        output_kind: what the first output is (:data:`pipeline.data.outputs.OUTPUT_KINDS`; default: detected from its
            shape where that is unambiguous; an output it cannot tell apart is evaluated by fidelity only).
        decode: decoder thresholds of dense outputs (CTC blank, map threshold, the reference's YOLO confidence, NMS).

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
    classifier = is_classifier(proto)
    check_classifier_labels(proto, dataset)
    kind = None if classifier else scored_kind(proto, output_kind, fidelity=reference is not None)
    if classifier and output_kind not in (None, "classes"):
        raise UserInputError(f"--output-kind {output_kind}: the first output '{proto.graph.output[0].name}' is (N, K) "
                             f"class scores, which only the 'classes' kind reads")
    if not classifier and kind is None and reference is None:
        out = proto.graph.output[0]
        raise UserInputError(f"the first output '{out.name}' is not (N, K) class scores, so there is no accuracy to "
                             f"measure; give the original model with --reference to report output fidelity")
    dense = None if kind is None else dense_scorer(proto, dataset, kind, with_reference=reference is not None,
                                                   decode=decode)
    num_classes = _num_classes(proto) if classifier else 0
    specs = model_input_specs(proto)
    names = [o.name for o in proto.graph.output]
    session = open_session(proto.SerializeToString(), backend, intra_op_threads)
    ref_session = None
    if reference is not None:
        ref_proto = _as_model(reference)
        _check_same_inputs(specs, model_input_specs(ref_proto))
        ref_session = open_session(ref_proto.SerializeToString(), backend, intra_op_threads)
    totals = _Totals(classifier)
    width = num_classes
    per_run = samples_per_run(proto, batch_size)  # same outputs, the memory of fewer samples per call
    for batch in stream(session, dataset, None, specs, batch_size=batch_size, stage="evaluate", progress=progress,
                        per_run=per_run):
        _check_finite(names, batch.outputs, "the model")
        if classifier:
            width = num_classes or batch.outputs[0].shape[1]
            if batch.labels is not None:
                totals.add_labels(batch.outputs[0], check_labels(batch.labels, batch.size, width))
        ref_outputs = None
        if ref_session is not None:
            ref_outputs = run(ref_session, None, batch.feeds, stage="evaluate", per_run=per_run)
            _check_finite([o.name for o in ref_proto.graph.output], ref_outputs, "the reference")
            totals.add_reference(names, batch.outputs, ref_outputs)
        if dense is not None:
            labels = None if dense.against == "reference" else dataset.targets.take(batch.start,
                                                                                  batch.start + batch.size)
            dense.update(batch.outputs[0], dict(batch.feeds), labels, None if ref_outputs is None else ref_outputs[0])
        totals.n += batch.size
    return _report(totals, width, ref_session is not None, dense)


def check_classifier_labels(model: onnx.ModelProto, dataset: Any, role: str = "evaluation") -> None:
    """Refuse dense labels (class maps, sequences, boxes: ``dataset.targets``) for a model whose first output is
    ``(N, K)`` class scores: it takes one class id per sample.

    Raises:
        UserInputError: the dataset holds dense labels and no per-sample class ids, and the model is a classifier.
    """
    targets = getattr(dataset, "targets", None)
    if targets is None or getattr(dataset, "labels", None) is not None or not is_classifier(model):
        return
    raise UserInputError(f"{role} data '{getattr(dataset, 'name', dataset)}' holds {targets.kind} labels "
                         f"({targets.format}), but the model's first output '{model.graph.output[0].name}' is (N, K) "
                         "class scores, which take one class id per sample: give labels of shape (N,) (or none)")


def scored_kind(model: onnx.ModelProto, output_kind: str | None, *, fidelity: bool = False) -> str | None:
    """The dense kind of a non-classifier's first output; None when the shape does not tell (fidelity only) and
    no ``output_kind`` was given, or, with ``fidelity`` (a reference to compare outputs with), when the detected
    kind's metric needs an optional package that is not installed (a warning names the ``[metrics]`` extra)."""
    if output_kind is not None:
        return dense_kind(model, output_kind)
    try:
        kind = dense_kind(model)
        if kind is not None:
            output_classes(model, kind)  # a dynamic class axis: nothing to decode against
            from pipeline.evaluation.metrics import METRICS_EXTRA, NEEDS, available

            if fidelity and not available(kind):  # detected, not asked for: fidelity only, and say how to get it
                logger.warning("the %s metric of this %s output needs '%s' (%s); output fidelity only",
                               "mAP" if kind == "yolo" else "CER", kind, NEEDS[kind], METRICS_EXTRA)
                return None
        return kind
    except UserInputError as err:
        logger.info("no dense metric for this model (%s); output fidelity only", err)
        return None

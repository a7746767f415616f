"""What calibration pairs features with: one class per image, per location or per time step, from data or model.

Kinds of target (``Targets.kind``; the statistics hold one class per calibration sample either way):

* ``classes``: one class per image (a ``y`` vector ``(N,)``, class sub-folders, or a classifier's ``argmax``);
* ``map``: a class per pixel (segmentation masks, a model's per-pixel decisions); ``-1`` = ignore (255 in files);
* ``boxes``: objects ``class, cx, cy, w, h`` normalised to the model input, rasterised per location
  (:mod:`pipeline.data.locations`), background = the class after the detection classes;
* ``sequence``: a class sequence per image (CTC recognition), aligned to the time steps by the original model's own
  forced alignment (:func:`pipeline.data.outputs.ctc_align`), background = the blank.

Label sources (``--labels``): ``data`` (the dataset's labels: ``Dataset.labels`` per image, ``Dataset.targets``
dense, read by :mod:`pipeline.data.labels` from ``.npz`` arrays, YOLO, COCO or mask files) or ``model`` (the original
model's own decisions on the calibration data, :mod:`pipeline.data.outputs`: argmax per image, per time step or per pixel,
binarised probability maps, confident YOLO detections after NMS). Default (:func:`resolve_targets`): ``data`` when
the data has labels, else ``model`` when the method needs labels (the result line says so), else none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.labels import LABEL_FORMATS, TargetSource
from pipeline.data.locations import Sampling
from pipeline.data.outputs import OUTPUT_KINDS, DecodeOptions, detect_output_kind, output_classes
from pipeline.errors import CalibrationError, UserInputError

__all__ = ["LABEL_FORMATS", "LABEL_SOURCES", "TARGET_KINDS", "LabelOptions", "Targets", "describe_record",
           "resolve_targets"]

LABEL_SOURCES = ("data", "model")
TARGET_KINDS = ("classes", "map", "boxes", "sequence")


# ------------------------------------------------------------------------------------------------------ resolution


@dataclass(frozen=True)
class LabelOptions:
    """What the user asked for (``--labels``, ``--output-kind``, decoder thresholds, location sampling)."""

    source: str | None = None
    output_kind: str | None = None
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self) -> None:
        if self.source is not None and self.source not in LABEL_SOURCES:
            raise UserInputError(f"--labels is 'data' or 'model', got {self.source!r}")
        if self.output_kind is not None and self.output_kind not in OUTPUT_KINDS:
            raise UserInputError(f"--output-kind is one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}")


@dataclass(frozen=True)
class Targets:
    """The targets calibration uses (resolved: :func:`resolve_targets`; recorded in statistics, scores, plans and
    reports).

    Attributes:
        source: ``data`` or ``model``.
        kind: ``classes``, ``map``, ``boxes`` or ``sequence``.
        num_classes: ``K`` of the statistics (boxes: detection classes + 1 for the background).
        background: the class capped as background in location sampling (None for ``classes``).
        output_kind: how the model's first output is read (model labels, alignment of text), else None.
        format: the data's label format (``npz``, ``yolo``, ``coco``, ``mask``, ``text``, ``classes``), else None.
        reason: why this source (e.g. that the data has no labels).
        decode, sampling: the decoder thresholds and the location sampling.
    """

    source: str
    kind: str
    num_classes: int
    background: int | None = None
    output_kind: str | None = None
    format: str | None = None
    reason: str = ""
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    sampling: Sampling = field(default_factory=Sampling)

    @property
    def dense(self) -> bool:
        """True for targets per location or time step (calibration samples locations, not images)."""
        return self.kind != "classes"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        doc: dict[str, Any] = {"labels": self.source, "kind": self.kind, "num_classes": self.num_classes}
        for key in ("background", "output_kind", "format"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        if self.reason:
            doc["reason"] = self.reason
        if self.dense:
            doc["sampling"] = {"per_class": self.sampling.per_class,
                               "background_ratio": self.sampling.background_ratio}
        if self.output_kind == "sequence" or self.kind == "sequence":
            doc["blank"] = self.decode.blank
        if self.source == "model" and self.output_kind == "map":
            doc["map_threshold"] = self.decode.map_threshold
        if self.source == "model" and self.output_kind == "yolo":
            doc.update(conf_threshold=self.decode.conf, iou_threshold=self.decode.iou)
        return doc

    def describe(self) -> str:
        """A few words for the result line (:func:`describe_record`)."""
        return describe_record(self.to_dict())


def _model_targets(model: Any, options: LabelOptions, reason: str) -> Targets:
    kind = options.output_kind or detect_output_kind(model)
    k = output_classes(model, kind)
    target = OUTPUT_KINDS[kind].target
    background = {"classes": None, "sequence": options.decode.blank, "map": 0, "boxes": k}[target]
    if target == "sequence" and options.decode.blank >= k:
        raise UserInputError(f"--blank {options.decode.blank} is not a class of the output ({k} classes)")
    return Targets("model", target, k + 1 if target == "boxes" else k, background, kind, None, reason,
                   options.decode, options.sampling)


def _data_targets(model: Any, dataset: Any, options: LabelOptions) -> Targets:
    source: TargetSource | None = getattr(dataset, "targets", None)
    if source is None:
        raise CalibrationError("internal: no dense labels")
    if source.kind == "sequence":
        kind = options.output_kind or detect_output_kind(model)
        if kind != "sequence":
            raise UserInputError(f"text labels are aligned to time steps through a CTC output [N, T, K], but the "
                                 f"model's output reads as '{kind}'; give --output-kind sequence if it is one")
        k = output_classes(model, "sequence")
        if source.num_classes > k:
            raise CalibrationError(f"text labels hold class id {source.num_classes - 1}, the CTC output has {k} "
                                   f"classes")
        return Targets("data", "sequence", k, options.decode.blank, "sequence", source.format, "",
                       options.decode, options.sampling)
    k = source.num_classes
    if source.kind == "boxes":
        return Targets("data", "boxes", k + 1, k, None, source.format, "", options.decode, options.sampling)
    return Targets("data", "map", max(k, 2), 0, None, source.format, "", options.decode, options.sampling)


def resolve_targets(model: Any, dataset: Any, options: LabelOptions | None, *, require: bool,
                    image_classes: Callable[[], int] | None = None) -> Targets | None:
    """The targets of a calibration (module docstring): ``options.source`` or the default; None when no labels are
    wanted or available (label-free statistics).

    Args:
        model: the (prepared, canonical) model; its first output is what ``model`` labels read.
        dataset: the calibration data (``labels``: per-image classes; ``targets``: a :class:`TargetSource`).
        options: the user's options (None: defaults).
        require: the method needs labels (DI, LDA, PLS-VIP): without any in the data, the model's are used.
        image_classes: K of per-image data labels (default: the dataset's ``num_classes``).

    Raises:
        UserInputError: ``--labels data`` without labels; an output the model labels cannot read.
    """
    options = options or LabelOptions()
    labels = getattr(dataset, "labels", None)
    dense = getattr(dataset, "targets", None)
    has_data = labels is not None or dense is not None
    source = options.source
    if source == "data" and not has_data:
        raise UserInputError(f"--labels data: the data '{getattr(dataset, 'name', dataset)}' has no labels (an .npz "
                             f"without 'y', an image folder without class sub-folders, no --labels-path); use "
                             f"--labels model (the original model's own decisions) or give labels")
    if source is None:
        if has_data:
            source = "data"
        elif require:
            return _model_targets(model, options, "the data has no labels")
        else:
            return None
    if source == "model":
        return _model_targets(model, options, "")
    if dense is not None:
        return _data_targets(model, dataset, options)
    k = image_classes() if image_classes is not None else int(getattr(dataset, "num_classes", 0) or 0)
    return Targets("data", "classes", k, None, None, "classes", "", options.decode, options.sampling)


def describe_record(record: Mapping[str, Any] | None) -> str:
    """The result-line words of a recorded :meth:`Targets.to_dict` (empty for None)."""
    if not record:
        return ""
    what = {"classes": "per image", "map": "per location (class maps)", "boxes": "per location (boxes)",
            "sequence": "per time step"}.get(str(record.get("kind")), str(record.get("kind")))
    text = f"labels from the {record.get('labels')} {what}"
    return f"{text} ({record['reason']})" if record.get("reason") else text

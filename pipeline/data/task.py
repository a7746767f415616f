"""The user's task: a generalist classifier used for a few of its classes, or for groups of them.

A :class:`Task` is either a list of classes (``--task-classes 3,8``: the task's class ``i`` is the model's class
``classes[i]``) or named groups of classes (``--task-map FILE.json``: ``{"odd": [1, 3, 5, 7, 9], "even": [0, 2, 4, 6,
8]}``; the task's class ``i`` is the ``i``-th group). It acts on the three things a run touches:

* the model: :meth:`Task.head` rewrites the first output into the task's scores (:mod:`graph_ops.task_head`: sliced
  head rows, or log-sum-exp of member logits per group), so calibration, scoring and recovery all see the task's
  outputs (recovery refits against the original model's task logits, not the K-class ones);
* the data: :meth:`Task.dataset` keeps the samples whose label belongs to the task, in order, and maps each label
  to its task index; samples of other classes never reach the statistics (their count is logged and kept in
  :attr:`TaskData.dropped`);
* the records: :meth:`Task.to_dict` goes into the plan's meta, the statistics header and the report, so ``score``,
  ``plan``, ``apply`` and ``eval`` rebuild the same head.
"""

from __future__ import annotations

import json
import logging
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from graph_ops.io import read_text
from graph_ops.task_head import group_classes, model_task, restrict_classes
from pipeline.errors import UserInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """Classes (``classes``) or groups of classes (``groups``: name -> members) of the model that the task uses."""

    classes: tuple[int, ...] | None = None
    groups: tuple[tuple[str, tuple[int, ...]], ...] | None = None

    def __post_init__(self) -> None:
        if (self.classes is None) == (self.groups is None):
            raise UserInputError("a task is either --task-classes or --task-map, not both (and not neither)")
        members = list(self.classes or ()) + [c for _, group in self.groups or () for c in group]
        if self.classes is not None and len(self.classes) < 2:
            raise UserInputError(f"--task-classes needs at least two classes, got {list(self.classes)}")
        if len(set(members)) != len(members):
            raise UserInputError(f"a class appears twice in the task: {members}")
        if any(c < 0 for c in members):
            raise UserInputError(f"class ids are non-negative integers, got {members}")

    @property
    def names(self) -> tuple[str, ...]:
        """The task's classes as labels: ``"3"``, ``"8"`` or the group names."""
        if self.classes is not None:
            return tuple(str(c) for c in self.classes)
        return tuple(name for name, _ in self.groups or ())

    def label_map(self) -> dict[int, int]:
        """Model class -> task class index."""
        if self.classes is not None:
            return {c: i for i, c in enumerate(self.classes)}
        return {c: i for i, (_, group) in enumerate(self.groups or ()) for c in group}

    def head(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The model with its first output rewritten into the task's scores (unchanged when it already carries
        this task's head; refused when it carries another one)."""
        recorded = model_task(model)
        if recorded is not None:
            if recorded.get("task") != self.to_dict():
                raise UserInputError(f"the model already has a task head for {recorded.get('task')}, not for "
                                     f"{self.to_dict()}; give the original model")
            return model
        if self.classes is not None:
            out = restrict_classes(model, self.classes)
        else:
            out = group_classes(model, dict(self.groups or ()))
        _tag(out, self.to_dict())
        return out

    def dataset(self, data: Any) -> TaskData:
        """The samples of ``data`` whose label belongs to the task, labels mapped to task indices."""
        labels = getattr(data, "labels", None)
        if labels is None:
            raise UserInputError(f"a task (--task-classes / --task-map) selects samples by label, but dataset "
                                 f"'{getattr(data, 'name', data)}' has no labels; give labelled data")
        mapping = self.label_map()
        labels = np.asarray(labels)
        rows = np.flatnonzero(np.isin(labels, list(mapping)))
        if rows.size == 0:
            raise UserInputError(f"dataset '{data.name}' has no sample of the task's classes {sorted(mapping)}")
        mapped = np.asarray([mapping[int(v)] for v in labels[rows]], np.int64)
        mapped.setflags(write=False)
        base_loader = data.loader

        def loader(idx: np.ndarray) -> dict[str, np.ndarray]:
            return base_loader(rows[idx])

        dropped = int(labels.size - rows.size)
        if dropped:
            logger.info("task %s: %d of %d samples of other classes dropped from '%s'", self.describe(), dropped,
                        labels.size, data.name)
        spec = getattr(data, "spec", None)
        kept = replace(data, name=f"{data.name} task={self.describe()}", num_samples=int(rows.size), labels=mapped,
                       loader=loader, spec=None if spec is None else spec.then("task", self.to_dict()))
        return TaskData(kept, dropped, int(labels.size))

    def describe(self) -> str:
        """``classes 3,8`` or ``groups odd,even``."""
        if self.classes is not None:
            return "classes " + ",".join(str(c) for c in self.classes)
        return "groups " + ",".join(self.names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what plans, statistics and reports record); groups as ``[name, members]`` pairs, since
        their order is the order of the task's outputs (JSON objects get their keys sorted in plan files)."""
        if self.classes is not None:
            return {"classes": list(self.classes)}
        return {"groups": [[name, list(group)] for name, group in self.groups or ()]}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None, source: str = "task record") -> Task | None:
        """Inverse of :meth:`to_dict` (None passes through); a malformed record (a plan, statistics or scores file
        edited by hand) raises UserInputError naming ``source``."""
        if not doc:
            return None
        try:
            if not isinstance(doc, Mapping):
                raise TypeError(type(doc).__name__)
            if "classes" in doc:
                return cls(classes=tuple(_class_id(c) for c in doc["classes"]))
            groups = doc["groups"]
            pairs = groups.items() if isinstance(groups, Mapping) else groups
            return cls(groups=tuple((str(k), tuple(_class_id(c) for c in v)) for k, v in pairs))
        except (KeyError, TypeError, ValueError) as err:
            raise UserInputError(f"{source}: malformed task {doc!r} ({err!r}); expected {{\"classes\": [class ids]}} "
                                 "or {\"groups\": [[name, [class ids]], ...]}") from None


def _class_id(value: Any) -> int:
    """A class id of a task record: an integer (not a bool, not a float)."""
    if isinstance(value, bool):
        raise TypeError(f"class id {value!r}")
    return operator.index(value)


@dataclass(frozen=True)
class TaskData:
    """A dataset restricted to a task, and how many samples of other classes were dropped."""

    data: Any
    dropped: int
    total: int


def _tag(model: onnx.ModelProto, task: dict[str, Any]) -> None:
    """Add the task itself to the head's metadata (graph_ops records the head's shape of it)."""
    for prop in model.metadata_props:
        if prop.key == "diprune.task":
            doc = json.loads(prop.value)
            doc["task"] = task
            prop.value = json.dumps(doc, sort_keys=True)


def parse_classes(text: str) -> Task:
    """``--task-classes 3,8`` -> Task."""
    try:
        classes = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise UserInputError(f"--task-classes takes comma-separated class ids, e.g. 3,8; got {text!r}") from None
    return Task(classes=classes)


def load_task_map(path: str | os.PathLike[str]) -> Task:
    """``--task-map FILE.json`` (``{"group": [class ids], ...}``, at least two groups) -> Task."""
    try:
        doc = json.loads(read_text(path, "task map file"))
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path} is not JSON ({err}); write {{\"group\": [class ids], ...}}") from err
    return task_from_map(doc, str(path))


def task_from_map(doc: Any, where: str) -> Task:
    """A grouped task from a parsed map (``{"group": [class ids], ...}``, at least two non-empty groups); errors name
    ``where`` (the file or the config key)."""
    if not isinstance(doc, Mapping) or not all(isinstance(v, list) and all(isinstance(c, int) and not isinstance(
            c, bool) for c in v) for v in doc.values()):
        raise UserInputError(f"{where}: a task map is an object of class-id lists, e.g. {{\"odd\": [1, 3], \"even\": "
                             "[0, 2]}")
    if len(doc) < 2 or any(not v for v in doc.values()):
        raise UserInputError(f"{where}: a task map needs at least two non-empty groups")
    return Task(groups=tuple((str(k), tuple(v)) for k, v in doc.items()))


def task_from_options(classes: str | None, task_map: str | None) -> Task | None:
    """The task given on the command line (``--task-classes`` or ``--task-map``), or None."""
    if classes and task_map:
        raise UserInputError("give --task-classes or --task-map, not both")
    if classes:
        return parse_classes(classes)
    return load_task_map(task_map) if task_map else None


def restrict(tasks: Sequence[Task | None]) -> Task | None:
    """The one task of several records (plan, statistics, options), or None; mismatches are refused."""
    given = [t for t in tasks if t is not None]
    if any(t != given[0] for t in given[1:]):
        raise UserInputError(f"the task differs between the inputs: {[t.to_dict() for t in given]}; use the same "
                             "--task-classes / --task-map for every step")
    return given[0] if given else None

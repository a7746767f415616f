"""The pruning report: what was asked, what was achieved, and how long each stage took.

Written beside the pruned model as ``<out>.report.json`` (format ``diprune.report/1``) so that an MLOps gate can read
the budget, the achieved MACs/params fractions, the kept channels per group and, when an evaluation set was given,
held-out accuracy of the original and the pruned model. With a task (``--task-classes`` / ``--task-map``) it records
the task head (original output name and width, the classes or groups kept) and how many samples of other classes were
dropped; with ``--max-drop`` every budget the search tried; ``artifacts`` each model file written per precision (fp32,
fp16, int8), what runs it and the command that builds and times it on the target (:mod:`pipeline.deployment.deploy`).
``calibration`` says how many samples each probe had against the advice (10 per feature), what they were paired with
(``calibration.targets``: labels from the data or the model, per image or per location) and ``recovery.advice``
which refit layers had fewer rows than 10 per unknown.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graph_ops.io import atomic_write_bytes


@dataclass(frozen=True)
class Report:
    """Result of one ``prune`` run."""

    model: str
    model_sha256: str
    output: str
    output_sha256: str
    method: str
    budget: Mapping[str, Any]
    original: Mapping[str, float]
    pruned: Mapping[str, float]
    groups: Mapping[str, Mapping[str, int]]
    timings_s: Mapping[str, float]
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    recovery: Mapping[str, Any] = field(default_factory=dict)
    task: Mapping[str, Any] = field(default_factory=dict)
    search: tuple[Mapping[str, Any], ...] = ()
    calibration: Mapping[str, Any] = field(default_factory=dict)
    artifacts: Mapping[str, Any] = field(default_factory=dict)

    @property
    def macs_fraction(self) -> float | None:
        """Pruned MACs over original MACs (None when a dynamic input size leaves the MACs unknown)."""
        if self.pruned.get("macs") is None or not self.original.get("macs"):
            return None
        return self.pruned["macs"] / self.original["macs"]

    @property
    def params_fraction(self) -> float:
        """Pruned params over original params."""
        return self.pruned["params"] / self.original["params"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "format": "diprune.report/1",
            "model": self.model,
            "model_sha256": self.model_sha256,
            "output": self.output,
            "output_sha256": self.output_sha256,
            "method": self.method,
            "budget": dict(self.budget),
            "original": dict(self.original),
            "pruned": dict(self.pruned),
            "macs_fraction": None if self.macs_fraction is None else round(self.macs_fraction, 6),
            "params_fraction": round(self.params_fraction, 6),
            "groups": {k: dict(v) for k, v in self.groups.items()},
            "timings_s": {k: round(v, 4) for k, v in self.timings_s.items()},
            "recovery": dict(self.recovery),
            "evaluation": dict(self.evaluation),
            "notes": list(self.notes),
            **({"calibration": dict(self.calibration)} if self.calibration else {}),
            **({"task": dict(self.task)} if self.task else {}),
            **({"search": [dict(s) for s in self.search]} if self.search else {}),
            **({"artifacts": {k: dict(v) for k, v in self.artifacts.items()}} if self.artifacts else {}),
        }

    def to_json(self) -> str:
        """The report file's text."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON, atomically."""
        atomic_write_bytes(path, self.to_json().encode())
        return Path(path)

    def summary(self) -> str:
        """One line for the CLI."""
        acc = f", recovery {self.recovery['method']}" if self.recovery.get("method", "none") != "none" else ""
        pruned, original = self.evaluation.get("pruned") or {}, self.evaluation.get("original") or {}
        if pruned.get("top1") is not None and original.get("top1") is not None:
            acc += f", top-1 {original['top1']:.4f} -> {pruned['top1']:.4f}"
        if pruned.get("metrics") and (original or {}).get("metrics"):
            dense, before = pruned["metrics"], original["metrics"]
            against = "labels" if dense["against"] == "labels" else "the original's decisions"
            acc += f", {dense['primary']} {before['score']:.4f} -> {dense['score']:.4f} (against {against})"
        if pruned.get("agreement") is not None:
            acc += f", agreement with the original {pruned['agreement']:.4f}"
        elif pruned.get("relative_logit_error") is None and pruned.get("outputs"):
            worst = max(o["relative_error"] for o in pruned["outputs"].values())
            acc += f", output relative error vs the original {worst:.3g} (worst output)"
        if self.budget.get("max_drop") is not None:
            points = self.budget["max_drop"]
            acc += f", the smallest model tried within {points:g} point{'' if points == 1 else 's'}"
        paired = self.calibration.get("targets") or {}
        if paired.get("labels") == "model" or paired.get("kind", "classes") != "classes":
            from pipeline.data.targets import describe_record

            acc += f", {describe_record(paired)}"
        if any(note.startswith("budget not reached") for note in self.notes):
            acc += ", budget NOT reached (the warning and the report's notes say what blocked it)"
        targets = {k: self.budget.get(f"target_{k}") for k in ("macs", "params")}
        macs_target = f", target {targets['macs']:g}" if targets["macs"] is not None else ""
        params_target = f", target {targets['params']:g}" if targets["params"] is not None else ""
        macs = "MACs unknown (dynamic input size)" if self.macs_fraction is None else (
            f"MACs {self.original['macs']:.4g} -> {self.pruned['macs']:.4g} ({self.macs_fraction:.3f}{macs_target})")
        return (f"{self.method}: {macs}, params {self.original['params']:.4g} -> {self.pruned['params']:.4g} "
                f"({self.params_fraction:.3f}{params_target}){acc}")

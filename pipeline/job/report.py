"""The report of ``diprune run``: every candidate against the original, the gates, the Pareto fronts and the best.

``OUTPUT/report.json`` (format ``diprune.run/1``)::

    {"format": "diprune.run/1", "exit_code": 0 | 3, "best": "<candidate name>" | null,
     "gates": {"max_top1_drop": 1.0, ...},
     "original": {"path", "sha256", "macs", "params", "top1", "top5", "n",
                  "latency": [{"batch", "median_ms", "p90_ms", "mean_ms", "speedup": 1.0}]},
     "candidates": [{"name": "di-macs0.5", "method", "target": {"kind": "macs" | "params", "fraction"}, "recover",
                     "path", "sha256", "macs", "params", "macs_fraction", "params_fraction", "budget_reached",
                     "notes", "top1", "top5", "top1_drop", "agreement", "relative_logit_error",
                     "latency": [{"batch", "median_ms", "p90_ms", "mean_ms", "speedup"}],
                     "passed": {"<gate>": true | false}, "passed_all", "pareto": {"macs", "latency"},
                     "groups": {"<group id>": {"size", "kept"}}, "reused", "timings_s",
                     "metrics": null | {...}, "metric_changes": null | {"<metric>": candidate - original}}],
     "data", "bench" (backend, settings, machine, warnings), "cache", "timings_s", "plots", "mlflow", "config"}

Accuracy values are fractions; ``top1_drop`` = original top-1 minus candidate top-1; a dense model's ``metrics``
(original and candidates: :mod:`pipeline.evaluation.dense_eval`, with ``against``: ``labels`` or ``reference``, and the
``primary`` metric as ``score``) and ``metric_changes`` (fractions; the dense gates read them, in points); ``speedup`` = median over the
interleaved rounds of (original median / candidate median) at that batch (:class:`pipeline.deployment.bench.Comparison`).
``pareto.macs`` / ``pareto.latency``: no other model (the original included) has fewer MACs (lower latency at the
first batch size) and at least the same accuracy, or the same cost and a higher accuracy (accuracy: top-1, a dense
model's primary metric, or the agreement with the original when the evaluation data has no labels). ``best``: among the candidates that pass every
gate, the one with the fewest MACs (ties: higher accuracy, then lower latency); exit code 0 when there is one, 3
when no candidate passes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeline.job.gates import check_gates

RUN_FORMAT = "diprune.run/1"


@dataclass(frozen=True)
class BatchLatency:
    """Latency of one model at one batch size, and its speedup over the original (1.0 for the original)."""

    batch: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    speedup: float


@dataclass(frozen=True)
class CandidateResult:
    """One candidate of a run: how it was made, what it costs, how it scores, and which gates it passes."""

    name: str
    method: str
    target_kind: str
    target: float
    recover: str
    path: str
    sha256: str
    macs: int
    params: int
    macs_fraction: float
    params_fraction: float
    budget_reached: bool
    notes: tuple[str, ...]
    top1: float | None
    top5: float | None
    top1_drop: float | None
    agreement: float | None
    relative_logit_error: float | None
    latency: tuple[BatchLatency, ...]
    groups: Mapping[str, Mapping[str, int]]
    reused: bool
    timings_s: Mapping[str, float]
    passed: Mapping[str, bool] = field(default_factory=dict)
    pareto_macs: bool = False
    pareto_latency: bool = False
    metrics: Mapping[str, Any] | None = None
    metric_changes: Mapping[str, float] | None = None

    @property
    def passed_all(self) -> bool:
        """True when every configured gate passed (also when there are none)."""
        return all(self.passed.values())

    @property
    def accuracy(self) -> float | None:
        """Top-1, a dense model's primary metric, or the agreement with the original when there are no labels."""
        if self.top1 is None and self.metrics:
            return self.metrics.get("score")
        return self.top1 if self.top1 is not None else self.agreement

    def to_dict(self) -> dict[str, Any]:
        """The report entry (see the module docstring)."""
        doc = asdict(self)
        doc["target"] = {"kind": doc.pop("target_kind"), "fraction": doc["target"]}
        doc["pareto"] = {"macs": doc.pop("pareto_macs"), "latency": doc.pop("pareto_latency")}
        doc["notes"] = list(self.notes)
        doc["passed_all"] = self.passed_all
        return doc


def pareto_front(points: Sequence[tuple[float, float | None]]) -> list[bool]:
    """For (cost, accuracy) points: True where no other point is at most as costly and at least as accurate, and
    better in one of the two. Points without an accuracy are never on the front."""
    front = []
    for i, (cost, acc) in enumerate(points):
        if acc is None:
            front.append(False)
            continue
        dominated = any(j != i and a is not None and c <= cost and a >= acc and (c < cost or a > acc)
                        for j, (c, a) in enumerate(points))
        front.append(not dominated)
    return front


def judge(candidates: Sequence[CandidateResult], gates: Mapping[str, float],
          original: tuple[float, float | None, float | None]) -> tuple[list[CandidateResult], str | None]:
    """Gates, Pareto fronts (``original``: its MACs fraction 1.0, latency at the first batch, accuracy) and the best.

    Returns:
        The candidates with ``passed`` and ``pareto_*`` filled in, and the name of the best (None if none passes).
    """
    judged = [replace(c, passed=check_gates(gates, c.to_dict())) for c in candidates]
    accuracy = [c.accuracy for c in judged] + [original[2]]
    by_macs = pareto_front([(c.macs_fraction, a) for c, a in zip(judged, accuracy, strict=False)] +
                           [(original[0], original[2])])
    latency = [c.latency[0].median_ms if c.latency else float("inf") for c in judged] + [original[1] or float("inf")]
    by_latency = pareto_front(list(zip(latency, accuracy, strict=True)))
    judged = [replace(c, pareto_macs=by_macs[i], pareto_latency=by_latency[i]) for i, c in enumerate(judged)]
    passing = [c for c in judged if c.passed_all]
    best = min(passing, key=lambda c: (c.macs_fraction, -(c.accuracy or 0.0),
                                       c.latency[0].median_ms if c.latency else 0.0, c.name), default=None)
    return judged, None if best is None else best.name


@dataclass(frozen=True)
class RunReport:
    """Everything ``diprune run`` found (see the module docstring for the JSON form)."""

    config: Mapping[str, Any]
    original: Mapping[str, Any]
    data: Mapping[str, Any]
    candidates: tuple[CandidateResult, ...]
    gates: Mapping[str, float]
    best: str | None
    bench: Mapping[str, Any]
    cache: Mapping[str, Any]
    timings_s: Mapping[str, float]
    plots: Mapping[str, Any] = field(default_factory=dict)
    mlflow: Mapping[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        """0 when a candidate passes every gate, 3 when none does."""
        return 0 if self.best is not None else 3

    def candidate(self, name: str) -> CandidateResult:
        """The candidate called ``name``."""
        return next(c for c in self.candidates if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (format ``diprune.run/1``)."""
        return {"format": RUN_FORMAT, "exit_code": self.exit_code, "best": self.best, "gates": dict(self.gates),
                "original": dict(self.original), "candidates": [c.to_dict() for c in self.candidates],
                "data": dict(self.data), "bench": dict(self.bench), "cache": dict(self.cache),
                "timings_s": {k: round(v, 4) for k, v in self.timings_s.items()}, "plots": dict(self.plots),
                "mlflow": None if self.mlflow is None else dict(self.mlflow), "config": dict(self.config)}

    def to_json(self) -> str:
        """The report file's text."""
        return json.dumps(self.to_dict(), indent=1, default=str) + "\n"

    def summary_lines(self, output: str) -> list[str]:
        """What the CLI prints: one line per candidate, then the verdict."""
        lines = [f"{'candidate':<18} {'MACs':>6} {'params':>6} {'top-1':>7} {'change':>7} {'speedup':>8}  gates (top-1 change in points; the lowest speedup over the batch sizes)"]
        for c in self.candidates:
            top1 = "-" if c.top1 is None else f"{c.top1:.4f}"
            drop = "-" if c.top1_drop is None else f"{-100 * c.top1_drop:+.2f}"
            speed = "-" if not c.latency else f"{min(b.speedup for b in c.latency):.2f}x"
            failed = [name for name, ok in c.passed.items() if not ok]
            verdict = "pass" if not failed else "FAIL " + ",".join(failed)
            lines.append(f"{c.name:<18} {c.macs_fraction:>6.3f} {c.params_fraction:>6.3f} {top1:>7} {drop:>7} "
                         f"{speed:>8}  {verdict}")
        if not self.gates:
            lines.append("no gates configured: every candidate passes")
        if self.best is not None:
            lines.append(f"best: {self.best} -> {output}/best.onnx (exit 0)")
        else:
            lines.append("no candidate passes every gate (exit 3)")
        lines.append(f"report: {output}/report.json, {output}/report.md")
        return lines

    def to_markdown(self) -> str:
        """``report.md``: the verdict, the candidates table, the plots, what was reused."""
        from pipeline.job.markdown import run_markdown

        return run_markdown(self.to_dict())

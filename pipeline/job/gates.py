"""Gates of ``diprune run``: the bar a candidate must meet to be deployable (the registry :data:`GATES`).

Every gate reads one measured value of a candidate (:func:`gate_value`) and compares it with the configured limit;
``max_*`` gates pass when the value is at most the limit, ``min_*`` gates when it is at least the limit (with a
1e-9 tolerance, so that a drop of exactly one point passes ``max_top1_drop: 1`` despite float rounding). A value
that was not measured (no labels, say) fails its gate. ``max_top1_drop`` is in accuracy points (1 = one point of
top-1), the unit of ``--max-drop``, ``--max-top1-drop`` and every report; a limit in (0, ``POINTS_FLOOR``) reads
like the old fraction spelling (0.01 for one point) and is refused by the config. The other accuracy gates are
fractions (``min_top1: 0.98``). ``GATE_RANGES`` bounds every limit (the config refuses values outside, and NaN).

Dense gates (:data:`DENSE_GATES`) limit the change of a dense model's metric (:mod:`pipeline.evaluation.dense_eval`) in points,
like ``max_top1_drop`` (1 = one point of mAP@0.5, mIoU, exact-sequence accuracy or CER, each a fraction times 100):
the candidate's metric and the original's, both against the evaluation data's dense labels, or both against the
original's own decisions when the data has none (the original then scores 1.0). A dense gate on a model whose first
output is of another kind is a config error (:func:`check_gates_fit_model`).

| gate | value |
|---|---|
| ``max_top1_drop`` | original top-1 minus candidate top-1 (held-out data), in points |
| ``min_top1`` | candidate top-1 |
| ``min_agreement`` | fraction of samples where candidate and original agree on the top class |
| ``max_relative_logit_error`` | ``||candidate - original|| / ||original||`` over all outputs |
| ``min_speedup`` | the smallest speedup over the benchmarked batch sizes (original median / candidate median) |
| ``max_latency_ms`` | the largest median latency over the benchmarked batch sizes, in ms |
| ``max_macs`` | candidate MACs / original MACs |
| ``max_params`` | candidate params / original params |
| ``max_map50_drop`` | original mAP@0.5 minus candidate mAP@0.5 (YOLO heads), in points |
| ``max_map50_95_drop`` | original mAP@0.5:0.95 minus candidate mAP@0.5:0.95 (YOLO heads), in points |
| ``max_miou_drop`` | original mIoU minus candidate mIoU (segmentation maps), in points |
| ``max_exact_drop`` | original exact-sequence accuracy minus the candidate's (CTC sequences), in points |
| ``max_cer_increase`` | candidate CER minus original CER (CTC sequences), in points |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GATES: dict[str, str] = {
    "max_top1_drop": "top-1 drop vs the original (accuracy points, 1 = one point)",
    "min_top1": "top-1 (fraction)",
    "min_agreement": "agreement with the original's top class (fraction)",
    "max_relative_logit_error": "relative logit error vs the original",
    "min_speedup": "speedup vs the original at every benchmarked batch size",
    "max_latency_ms": "median latency in ms at every benchmarked batch size",
    "max_macs": "MACs as a fraction of the original",
    "max_params": "params as a fraction of the original",
    "max_map50_drop": "mAP@0.5 drop vs the original (points)",
    "max_map50_95_drop": "mAP@0.5:0.95 drop vs the original (points)",
    "max_miou_drop": "mIoU drop vs the original (points)",
    "max_exact_drop": "exact-sequence accuracy drop vs the original (points)",
    "max_cer_increase": "character (element) error rate increase vs the original (points)",
}
"""Gate name -> what it limits (the config's ``gates:`` keys; see the module docstring)."""

DENSE_GATES: dict[str, tuple[str, str, float]] = {
    "max_map50_drop": ("yolo", "map50", -1.0), "max_map50_95_drop": ("yolo", "map50_95", -1.0),
    "max_miou_drop": ("map", "miou", -1.0), "max_exact_drop": ("sequence", "exact", -1.0),
    "max_cer_increase": ("sequence", "cer", 1.0),
}
"""Dense gate -> (output kind, metric, sign): the gate reads ``sign * 100 * (candidate - original)``."""

POINTS_GATES = ("max_top1_drop", *DENSE_GATES)
"""Gates whose limits are in points (``POINTS_FLOOR`` applies)."""

ACCURACY_GATES = ("max_top1_drop", "min_top1")
"""Gates that need labelled evaluation data."""

GATE_RANGES: dict[str, tuple[float | None, float | None]] = {
    "max_top1_drop": (0.0, 100.0), "min_top1": (0.0, 1.0), "min_agreement": (0.0, 1.0),
    "max_relative_logit_error": (0.0, None), "min_speedup": (0.0, None), "max_latency_ms": (0.0, None),
    "max_macs": (0.0, None), "max_params": (0.0, None),
    **dict.fromkeys(DENSE_GATES, (0.0, 100.0)),
}
"""Gate name -> (lowest, highest) limit the config accepts (None: unbounded)."""

POINTS_FLOOR = 0.1
"""Limits of ``POINTS_GATES`` in (0, POINTS_FLOOR) points are refused: they read like the fraction spelling."""

_TOLERANCE = 1e-9


def gate_value(name: str, candidate: Mapping[str, Any]) -> float | None:
    """The value a gate reads from a candidate entry of the run report (None when not measured)."""
    latency = candidate.get("latency") or []
    values: dict[str, Any] = {
        "max_top1_drop": None if candidate.get("top1_drop") is None else 100.0 * candidate["top1_drop"],
        "min_top1": candidate.get("top1"),
        "min_agreement": candidate.get("agreement"),
        "max_relative_logit_error": candidate.get("relative_logit_error"),
        "min_speedup": min((b["speedup"] for b in latency), default=None),
        "max_latency_ms": max((b["median_ms"] for b in latency), default=None),
        "max_macs": candidate.get("macs_fraction"),
        "max_params": candidate.get("params_fraction"),
    }
    if name in DENSE_GATES:
        _, metric, sign = DENSE_GATES[name]
        change = (candidate.get("metric_changes") or {}).get(metric)
        return None if change is None else sign * 100.0 * change
    return values[name]


def check_gates_fit_model(gates: Mapping[str, float], kind: str | None) -> None:
    """Refuse dense gates on a model whose first output is not of their kind (``kind``: ``sequence``, ``map``,
    ``yolo``, or None for a classifier or an output of no known kind)."""
    from pipeline.errors import UserInputError

    for name in gates:
        if name in DENSE_GATES and DENSE_GATES[name][0] != kind:
            wanted = DENSE_GATES[name][0]
            found = "class scores or an output of no known kind" if kind is None else f"output kind '{kind}'"
            raise UserInputError(f"config: gate '{name}' limits a metric of '{wanted}' outputs, but the model's first "
                                 f"output is {found}; use gates of its kind "
                                 f"({', '.join(g for g, v in DENSE_GATES.items() if v[0] == kind) or 'max_top1_drop, min_top1, min_agreement'}) "
                                 f"or set prune.output_kind if the kind was misread")


def check_gates(gates: Mapping[str, float], candidate: Mapping[str, Any]) -> dict[str, bool]:
    """``{gate: passed}`` for every configured gate."""
    result = {}
    for name, limit in gates.items():
        value = gate_value(name, candidate)
        if value is None:
            result[name] = False
        elif name.startswith("max_"):
            result[name] = value <= limit + _TOLERANCE
        else:
            result[name] = value >= limit - _TOLERANCE
    return result

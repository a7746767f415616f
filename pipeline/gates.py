"""Gates of ``diprune run``: the bar a candidate must meet to be deployable (the registry :data:`GATES`).

Every gate reads one measured value of a candidate (:func:`gate_value`) and compares it with the configured limit;
``max_*`` gates pass when the value is at most the limit, ``min_*`` gates when it is at least the limit (with a
1e-9 tolerance, so that a drop of exactly one point passes ``max_top1_drop: 1`` despite float rounding). A value
that was not measured (no labels, say) fails its gate. ``max_top1_drop`` is in accuracy points (1 = one point of
top-1), the unit of ``--max-drop``, ``--max-top1-drop`` and every report; a limit in (0, ``POINTS_FLOOR``) reads
like the old fraction spelling (0.01 for one point) and is refused by the config. The other accuracy gates are
fractions (``min_top1: 0.98``). ``GATE_RANGES`` bounds every limit (the config refuses values outside, and NaN).

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
}
"""Gate name -> what it limits (the config's ``gates:`` keys; see the module docstring)."""

ACCURACY_GATES = ("max_top1_drop", "min_top1")
"""Gates that need labelled evaluation data."""

GATE_RANGES: dict[str, tuple[float | None, float | None]] = {
    "max_top1_drop": (0.0, 100.0), "min_top1": (0.0, 1.0), "min_agreement": (0.0, 1.0),
    "max_relative_logit_error": (0.0, None), "min_speedup": (0.0, None), "max_latency_ms": (0.0, None),
    "max_macs": (0.0, None), "max_params": (0.0, None),
}
"""Gate name -> (lowest, highest) limit the config accepts (None: unbounded)."""

POINTS_FLOOR = 0.1
"""``max_top1_drop`` limits in (0, POINTS_FLOOR) points are refused: they read like the old fraction spelling."""

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
    return values[name]


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

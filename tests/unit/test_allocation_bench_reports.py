"""Bookkeeping of the allocation benchmarks' reports: measured vs rule per dense task (paired over subsets) and the
allocation each production row was planned with."""

from __future__ import annotations

from benchmarks.allocation_dense import markdown
from benchmarks.recovery_production import report_lines


def _row(bench: str, method: str, subset: int, allocation: str, value: float, metric: str = "exact") -> dict:
    return {"bench": bench, "method": method, "target": 0.35, "subset": subset, "allocation": allocation,
            "primary": metric, metric: value, "macs": 0.34}


def test_rule_minus_measured_is_paired_per_subset_with_a_verdict() -> None:
    rows = [_row("seg", "di-data", s, a, v, "miou") for s, (m, r) in enumerate([(0.20, 0.25), (0.21, 0.25), (0.19, 0.25)])
            for a, v in (("measured", m), ("rule", r))]
    rows += [_row("det", "l2", s, a, v, "map50") for s, (m, r) in enumerate([(0.40, 0.30), (0.45, 0.50)])
             for a, v in (("measured", m), ("rule", r))]
    text = markdown({"commands": ["python -m benchmarks.allocation_dense"], "machine": "m", "onnxruntime": "1",
                     "rows": rows})
    assert "| seg | 0.35 | 0 | di-data | 20.0 (0.340) | 25.0 (0.340) | +5.0 |" in text
    assert "| seg | 0.35 | di-data | +5.0 ± 0.6 rule | 3 |" in text  # diffs 5, 4, 6: mean 5, SE 1/sqrt(3)
    assert "| det | 0.35 | l2 | -2.5 ± 7.5 noise | 2 |" in text


def test_rows_of_the_first_run_without_task_or_target_read_as_the_digit_lines_at_035() -> None:
    rows = [{"subset": 0, "method": "l2", "allocation": a, "exact": v, "macs": 0.3}
            for a, v in (("measured", 0.4), ("rule", 0.5))]
    text = markdown({"commands": ["c"], "machine": "m", "onnxruntime": "1", "rows": rows})
    assert "| seq | 0.35 | l2 | +10.0 ± nan n=1 | 1 |" in text


def test_production_rows_name_the_allocation_they_were_planned_with() -> None:
    cell = {"map_iou": 0.9, "pixel_f1": 0.6, "macs_fraction": 0.75, "seconds": 1.0,
            "allocation": {"mode": "rule", "why": "over its cost cap"}}
    doc = {"models": {"det": {"original": {"map_iou": 1.0, "pixel_f1": 0.59},
                              "0.75": {"di": {"391f118": {"lstsq": cell}, "new": {"lstsq": {**cell, "allocation": {}}}}}}}}
    lines = report_lines(doc)
    assert "| 0.75 | di | 391f118 | lstsq (rule allocation) | IoU 90.0 / F1 60.0 | 0.750 | 1 |  |  |" in lines
    assert "| 0.75 | di | new | lstsq | IoU 90.0 / F1 60.0 | 0.750 | 1 |  |  |" in lines

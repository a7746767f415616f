"""The issue-14 benchmark's report: goal verdicts at the 0.05-point resolution, cells not run, kept markers."""

from __future__ import annotations

from benchmarks.finetune import ROWS, goal_lines, missing_lines, report_lines


def _models(ft: float, kept: bool | None = True) -> dict:
    cell = {"top1": ft, "macs_fraction": 0.06, "total_seconds": 10.0, "distill_loss": [0.4, 0.2]}
    if kept is not None:
        cell["kept"] = kept
    return {"mobilenet": {"original": {"top1": 0.989, "load_at_start": [1.0]},
                          "0.0625": {"di+lstsq": {"top1": 0.957, "macs_fraction": 0.06, "total_seconds": 5.0},
                                     "+ft3@8000": cell}}}


def test_exactly_one_point_below_meets_the_goal_and_one_digit_more_does_not() -> None:
    at_boundary = "\n".join(goal_lines(_models(0.979)))
    assert "97.90 (-1.00)" in at_boundary and "met by 0.00 (within noise)" in at_boundary
    assert "mobilenet not known" in at_boundary  # 0.125 was not run
    below = "\n".join(goal_lines(_models(0.9785)))
    assert "NOT met by 0.05" in below and "mobilenet NOT met" in below


def test_report_marks_rejected_finetunes_and_lists_what_was_not_run() -> None:
    doc = {"commands": {"python -m benchmarks.finetune": "2026-12-01"}, "protocol": {}, "models": _models(0.957, False)}
    text = "\n".join(report_lines(doc))
    assert "95.70 (0.060; 10 s; **not kept**)" in text
    assert "kept?" in "\n".join(report_lines({**doc, "models": _models(0.979, None)}))
    missing = "\n".join(missing_lines(doc["models"]))
    assert "`mobilenet 0.125 di+lstsq`" in missing and "`mobilenet 0.0625 +ft3@8000`" not in missing
    assert missing.count("`vgg ") == 2 * len(ROWS)

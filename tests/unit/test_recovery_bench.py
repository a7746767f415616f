"""The issue-31 benchmark scripts' bookkeeping: row options, per-kind summaries, fine-tune rows and verdicts."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.finetune_loops import OURS, loop_name, report_lines
from benchmarks.recovery_production import _row_options, summarise


def test_recovery_rows_parse_their_options() -> None:
    assert _row_options("lstsq") == ("lstsq", {})
    assert _row_options("lstsq[refit_positions=256,ridge=0.01]") == ("lstsq", {"refit_positions": 256, "ridge": 0.01})


def test_layer_errors_are_summarised_per_kind() -> None:
    layers = [{"kind": "depthwise", "error_before": 0.4, "error_after": 0.2, "alpha": 0.1},
              {"kind": "depthwise", "error_before": 0.6, "error_after": 0.6, "alpha": None},
              {"kind": "pooled", "error_before": 0.3, "error_after": 0.1, "alpha": 0.01}]
    got = summarise(layers)
    assert got["depthwise"] == {"layers": 2, "applied": 1, "error_before": pytest.approx(0.5),
                                "error_after": pytest.approx(0.4)}
    assert got["pooled"]["applied"] == 1


def test_finetune_rows_name_known_settings_and_the_verdict_compares_with_the_better_plain_loop() -> None:
    assert loop_name("diprune[b64,lr3e-3]") == "diprune[b64,lr3e-3]" and loop_name("adam-kd") == "adam-kd"
    with pytest.raises(argparse.ArgumentTypeError):
        loop_name("diprune[b7]")
    cells = {"original": {"top1": 0.99}, "0.1": {"pruned": {"top1": 0.97}, "seed0": {
        f"{OURS}@1": {"top1": 0.975, "wrong": list(range(50))}, "adam-ce@1": {"top1": 0.96},
        "adam-kd@1": {"top1": 0.9765, "wrong": list(range(3, 50))}}}}  # 3 digits only adam-kd gets right
    far = {"original": {"top1": 0.99}, "0.1": {"pruned": {"top1": 0.97}, "seed0": {
        f"{OURS}@1": {"top1": 0.97, "wrong": list(range(60))}, "adam-kd@1": {"top1": 0.98, "wrong": list(range(40))}},
        "seed1": {f"{OURS}@1": {"top1": 0.99}, "adam-kd@1": {"top1": 0.98}}}}  # seed1 has no digits: mean only
    text = "\n".join(report_lines({"models": {"cnn": cells, "lenet": far}}))
    assert "| cnn | 0.1 | 1 | -0.15 | 1 | 0 / 3 | 0.250 | behind within noise |" in text
    assert "| lenet | 0.1 | 1 | +0.00 | 1 | 0 / 20 | 0.000 | ahead or level |" in text
    assert "1 of 2 cells ahead or level, 1 behind within the noise, 0 behind beyond it." in text

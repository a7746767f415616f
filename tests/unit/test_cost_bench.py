"""The issue-30 cost benchmarks' bookkeeping: the prune's peak and the whole-process report."""

from __future__ import annotations

from benchmarks.pipeline_cost import STAGES, _peak
from benchmarks.whole_process_cost import markdown


def test_the_prune_peak_is_its_stages_not_the_reference_inferences() -> None:
    peaks = dict.fromkeys(STAGES, 1.2) | {"recover": 1.9, "plain": 2.3, "plain_pruned": 2.8}
    assert _peak({"peak_rss_gib": peaks}) == 1.9


def test_the_whole_process_report_gives_each_ratio_and_the_goal() -> None:
    doc = {"model": "resnet18 160x160", "images": 128, "batch": 64, "goal": 8.0, "cores": 2,
           "runs": [{"plain_s": 2.0, "prune_s": 15.0, "ratio": 7.5}], "prune_peak_rss_gib": 1.25,
           "loadavg_before": [3.0, 2.0, 1.0], "loadavg_after": [4.0, 2.0, 1.0]}
    text = markdown(doc)
    assert "| 1 | 2.0 | 15.0 | 7.50x |" in text and "<= 8x" in text and "1.25 GiB" in text

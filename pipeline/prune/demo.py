"""The built-in demo: prune the shipped MNIST CNN with DI and show what was gained.

Steps (all on shipped files, nothing downloaded): analyse the model's channel groups; calibrate on 2,000 digits of the
training split; prune to 1/8 of the MACs with ``di`` and, for comparison, with the data-free ``l2`` and ``random``
baselines (each with the default allocation: groups ranked by their measured damage), and with ``di`` under the
rule allocation of before issue 31 (``di-rule``: the criterion ranks the groups, first layer and classifier input
kept), each without recovery and with the default training-free recovery (``lstsq``, sequential); evaluate each on
the 2,000 held-out digits; prove the surgery exact by comparing the pruned model (before recovery) with the same plan
applied as a mask (zeroed exit weights) on the held-out digits. The budget is 1/8 of the MACs because there the
criteria differ by more than the test set's noise (``benchmarks/allocation.py``; at 1/2 every row was within 0.25
points of the original).
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

from graph_ops.channels import prunable_share
from graph_ops.errors import UserInputError
from graph_ops.mask import zero_channels
from pipeline.data.datasets import Dataset
from pipeline.data.named import open_dataset
from pipeline.model.runtime import make_session
from pipeline.prune.one_shot import write_candidate
from pipeline.prune.orchestrate import PruneRun, keep_lists
from pipeline.recovery import DEFAULT_RECOVERY
from pipeline.selection.plan import PruningPlan

DEMO_MODEL = "mnist_cnn.onnx"
CALIBRATION_SAMPLES = 2000
TARGET_MACS = 0.125
ROWS = (("di", "measured"), ("l2", "measured"), ("random", "measured"), ("di", "rule"))
"""The table's rows: each criterion with the default (measured) allocation, and DI with the rule before issue 31."""


def demo_model_path() -> Path:
    """The shipped demo model (a small CNN trained on the MNIST training split)."""
    return Path(str(resources.files("pipeline") / "assets" / DEMO_MODEL))


def _mask_agreement(run: PruneRun, pruned: onnx.ModelProto, plan: PruningPlan, dataset: Dataset) -> float:
    """Max |pruned - masked| / max |masked| over the evaluation inputs."""
    prepared = run.prepared
    pruned_session, _ = make_session(pruned.SerializeToString())
    masked, _ = make_session(zero_channels(prepared.model, prepared.index, keep_lists(plan)).SerializeToString())
    worst = 0.0
    for feeds, _ in dataset.bind([i.name for i in pruned_session.get_inputs()]).batches(500):
        a, b = pruned_session.run(None, feeds)[0], masked.run(None, feeds)[0]
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)))
    return worst


def run_demo(work: Path, *, progress: bool = True) -> Iterator[str]:
    """Run the demo, yielding the lines to print (one :class:`PruneRun`: one analysis, one calibration)."""
    if work.exists() and not work.is_dir():
        raise UserInputError(f"--work {work} is a file; give a directory (it is created when missing)")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserInputError(f"cannot create the work directory {work}: {err.strerror or err}") from err
    model = demo_model_path()
    calib = open_dataset("mnist", split="train", limit=CALIBRATION_SAMPLES)
    test = open_dataset("mnist", split="test")
    run = PruneRun(model, calib, progress=progress, work_dir=work)
    groups = run.prepared.index.groups
    yield (f"model {model.name}: {len(groups)} channel groups, {sum(g.prunable for g in groups)} prunable, "
           f"{prunable_share(run.prepared.model, run.prepared.index):.0%} of conv channels prunable")
    yield f"calibration: {calib.num_samples} training digits; evaluation: {test.num_samples} held-out digits"
    yield (f"{'method':<8} {'MACs kept':>9} {'params kept':>11} {'top-1 original':>14} "
           f"{'pruned, no recovery':>19} {'pruned + ' + DEFAULT_RECOVERY:>16}")
    original = run.evaluate(run.prepared.model, test, reference=False)
    exact = None
    measured = {}
    for method, allocation in ROWS:
        top1 = {}
        label = method if allocation == "measured" else f"{method}-rule"
        for recover in ("none", DEFAULT_RECOVERY):
            candidate = run.candidate(method, target_macs=TARGET_MACS, recover=recover, allocation=allocation)
            evaluation = {"original": original, "pruned": run.evaluate(candidate.model, test)}
            report = write_candidate(run, candidate, work / f"mnist_cnn.{label}.{recover}.onnx",
                                     evaluation=evaluation)
            top1[recover] = evaluation["pruned"]["top1"]
            if method == "di" and recover == "none" and allocation == "measured":
                exact = _mask_agreement(run, candidate.model, candidate.plan, test)
            if allocation == "measured":
                measured[method] = candidate.plan.meta["allocation"]
        yield (f"{label:<8} {report.macs_fraction:>9.3f} {report.params_fraction:>11.3f} "
               f"{original['top1']:>14.4f} {top1['none']:>19.4f} {top1[DEFAULT_RECOVERY]:>16.4f}")
    record = measured["di"]
    yield (f"allocation: each group's output damage measured on {record['samples']} calibration digits "
           f"({record['passes']} onnxruntime passes per method); di-rule: the criterion alone ranks the groups, first layer and classifier input kept")
    yield (f"exact surgery: pruned vs masked (same di plan, exit weights zeroed, before recovery) max relative "
           f"output difference {exact:.2e}")
    yield f"outputs in {work}/ (pruned models and their .report.json)"

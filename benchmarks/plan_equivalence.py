"""Issue 31's equivalence check: without a measurement, the planner makes the plans it made before.

The planner of a baseline commit (default ``a18b2bc``, before the measured allocation; its ``pipeline/plan.py`` read
with ``git show`` and imported as a module of its own) and the current one plan from the *same* scores (current
scorers, calibration on the first 1,000 training digits, 1 thread) for the demo CNN and the five MNIST families, seven
criteria, five MACs targets, ``round_to`` 4 and 8, ends protected or not, fill-back on or off; the plan files are
compared as text. Run from the repository root: ``python -m benchmarks.plan_equivalence [--baseline a18b2bc]``;
writes ``benchmarks/results/plan_equivalence.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.data.named import open_dataset
from pipeline.deployment.bench import machine_info
from pipeline.prune.orchestrate import PruneRun
from pipeline.selection.allocate import select_channels

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "plan_equivalence.json"
MODELS = {"cnn": "pipeline/assets/mnist_cnn.onnx",
          **{f: f"benchmarks/models/mnist_{f}.onnx" for f in ("vgg", "resnet", "mobilenet", "inception", "lenet")}}
METHODS = ("di", "lda", "pls-vip", "l2", "random", "mean-act", "apoz")
TARGETS = (0.75, 0.5, 0.35, 0.25, 0.125)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="a18b2bc")
    args = parser.parse_args()
    # the baseline predates issue 29's stage packages: its planner sat at the top of the package and imported the
    # scorers' base from the top-level scorers package; both spelled in pieces so that the move's rewrite leaves them
    old_layout = {"pipeline." + "scorers.base": "pipeline.selection.scorers.base"}
    source = subprocess.run(["git", "show", f"{args.baseline}:" + "/".join(("pipeline", "plan.py"))], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    for old_name, new_name in old_layout.items():
        source = source.replace(old_name, new_name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "baseline_plan.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("baseline_plan", path)
        old = importlib.util.module_from_spec(spec)
        sys.modules["baseline_plan"] = old
        spec.loader.exec_module(old)
    calib = open_dataset("mnist", split="train", limit=1000)
    total, differ = 0, []
    for name, model in MODELS.items():
        run = PruneRun(ROOT / model, calib, progress=False, intra_op_threads=1)
        for method in METHODS:
            scores = run.scores(method)
            for target, round_to, ends, fill in itertools.product(TARGETS, (4, 8), (True, False), (True, False)):
                options = {"target_macs": target, "round_to": round_to, "keep_first_and_last": ends,
                           "fill_back": fill}
                total += 1
                if old.select_channels(scores, run.prepared.index, **options).to_json() != \
                        select_channels(scores, run.prepared.index, **options).to_json():
                    differ.append({"model": name, "method": method, **options})
    doc = {"baseline": args.baseline, "plans": total, "identical": total - len(differ), "differ": differ,
           "machine": machine_info()}
    RESULT.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(json.dumps({k: doc[k] for k in ("plans", "identical")}))


if __name__ == "__main__":
    main()

"""Issue 9's equivalence check: plans and recovered models before and after the spine refactor.

The refactor (one analysis per run, calibration pooled inside the graph, recovery in one sweep) must not change
results: plans byte-identical, recovered models equal up to floating-point rounding (max relative output difference
<= 1e-5). This script runs the same jobs with the code of a baseline commit (default ``e102290``, the last commit
before the refactor, checked out into a temporary git worktree and run in a child process with its own API) and
with the current code, on the demo CNN and the four MNIST families (``benchmarks/models``):

* calibration on the first 1,000 training digits (``gap`` and ``avg2`` pooling), onnxruntime CPU, 1 thread;
* plans of ``di`` (both poolings), ``lda``, ``pls-vip``, ``l2``, ``random``, ``mean-act``, ``apoz`` at 0.5 and 0.25
  of the MACs (16 plan files per model), compared as text;
* recovered models: ``di`` 0.25 + ``lstsq`` sequential, ``di`` 0.5 + ``regress`` sequential, ``di`` 0.5 + ``bias``
  one-pass, ``l2`` 0.25 + ``lstsq`` one-pass, compared on the logits of 500 held-out digits.

Run from the repository root: ``python -m benchmarks.spine_equivalence [--baseline e102290]`` (about 5 minutes);
writes ``benchmarks/results/spine_equivalence.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "spine_equivalence.json"
MODELS = {"cnn": "pipeline/assets/mnist_cnn.onnx", "vgg": "benchmarks/models/mnist_vgg.onnx",
          "resnet": "benchmarks/models/mnist_resnet.onnx", "mobilenet": "benchmarks/models/mnist_mobilenet.onnx",
          "inception": "benchmarks/models/mnist_inception.onnx"}
METHODS = ("di", "lda", "pls-vip", "l2", "random", "mean-act", "apoz")
RECOVERIES = (("di", 0.25, "lstsq", True), ("di", 0.5, "regress", True), ("di", 0.5, "bias", False),
              ("l2", 0.25, "lstsq", False))
TOLERANCE = 1e-5


def _capture(root: Path, out: Path, api: str) -> None:
    """Plans and recovered logits with the code under ``root`` (``api``: ``old`` = the baseline's, ``new``)."""
    sys.path.insert(0, str(root))
    import onnxruntime as ort

    from graph_ops.prune import apply_plan
    from pipeline.data.named import open_dataset
    from pipeline.prune.orchestrate import keep_lists, prepare, score
    from pipeline.selection.allocate import select_channels

    if api == "old":
        from pipeline.recover import recover

        from pipeline.calibration.calibrate import calibrate, default_probes
    else:
        from pipeline.calibration.calibrate import calibrate
        from pipeline.recovery import recover
    out.mkdir(parents=True, exist_ok=True)
    calib = open_dataset("mnist", split="train", limit=1000)
    feeds = next(open_dataset("mnist", split="test", limit=500).batches(500))[0]
    for name, rel in MODELS.items():
        prep = prepare(root / rel)
        stats = {}
        for pooling in ("gap", "avg2"):
            options = {"pooling": pooling, "backend": "ort-cpu", "intra_op_threads": 1, "progress": False}
            if api == "old":
                options.update(probes=default_probes(prep.model, prep.index), canonical=prep.model)
            stats[pooling] = calibrate(prep.path if api == "old" else prep, calib, **options)
        plans = {}
        for method in METHODS:
            for pooling in ("gap", "avg2") if method == "di" else ("gap",):
                scores = score(prep, stats[pooling], method, seed=0)
                for target in (0.5, 0.25):
                    plan = select_channels(scores, prep.index, target_macs=target)
                    plans[f"{method}.{pooling}.{target}"] = plan.with_sha(prep.sha256).to_json()
        (out / f"{name}.plans.json").write_text(json.dumps(plans, indent=1, sort_keys=True))
        for method, target, how, sequential in RECOVERIES:
            keep = keep_lists(select_channels(score(prep, stats["gap"], method, seed=0), prep.index,
                                              target_macs=target))
            model, _ = recover(prep.model, apply_plan(prep.model, prep.index, keep), prep.index, keep, calib,
                               method=how, sequential=sequential, backend="ort-cpu", intra_op_threads=1)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            logits = session.run(None, {session.get_inputs()[0].name: next(iter(feeds.values()))})[0]
            np.save(out / f"{name}.{method}.{target}.{how}.{int(sequential)}.npy", logits)


def compare(old: Path, new: Path) -> dict:
    """Plan files compared as text, recovered logits by max relative difference."""
    result: dict = {"plans": {}, "recovered": {}}
    for path in sorted(old.glob("*.plans.json")):
        a, b = json.loads(path.read_text()), json.loads((new / path.name).read_text())
        result["plans"][path.name.split(".")[0]] = {"plans": len(a), "differ": [k for k in a if a[k] != b.get(k)]}
    for path in sorted(old.glob("*.npy")):
        a, b = np.load(path), np.load(new / path.name)
        result["recovered"][path.stem] = float(np.abs(a - b).max() / np.abs(a).max())
    result["identical_plans"] = all(not v["differ"] for v in result["plans"].values())
    result["recovered_within_tolerance"] = all(v <= TOLERANCE for v in result["recovered"].values())
    return result


def main() -> None:
    """Capture with both code bases (each in its own process) and compare."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="e102290")
    parser.add_argument("--capture", choices=("old", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.capture:
        _capture(args.root, args.out, args.capture)
        return
    from pipeline.deployment.bench import machine_info

    with tempfile.TemporaryDirectory(prefix="diprune-equivalence-") as tmp:
        tree = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            seconds = {}
            for api, root in (("old", tree), ("new", ROOT)):
                start = time.perf_counter()
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--capture", api, "--root", str(root),
                                "--out", str(Path(tmp) / api)], cwd=root, check=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
                seconds[api] = round(time.perf_counter() - start, 1)
            result = compare(Path(tmp) / "old", Path(tmp) / "new")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    doc = {"baseline": args.baseline, "tolerance": TOLERANCE, "seconds": seconds, **result, "machine": machine_info()}
    RESULT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("identical_plans", "recovered_within_tolerance", "seconds")}))
    print("worst recovered difference", max(result["recovered"].values()))


if __name__ == "__main__":
    main()

"""Issue 30's accuracy check: recovery with float32 per-batch products against the float64 path.

Recovery's moments (``graph_ops.least_squares.products``) used to be float64 products of float64 copies of every
batch; they are now float32 products of mean-shifted rows summed in float64. This script runs the same jobs with
the code of a baseline commit (default ``64eaa97``, the float64 path; extracted with ``git archive`` into a
temporary folder and run in a child process) and with the current code, on the demo CNN and the four MNIST
families (``benchmarks/models``):

* calibration on the first 1,000 training digits (``gap`` pooling), onnxruntime CPU, 1 thread;
* plans of ``di`` and ``l2`` at 0.5 and 0.25 of the MACs, compared as text (the scoring statistics stay float64,
  so they must be byte-identical);
* recovered models: ``di`` 0.25 + ``lstsq`` sequential, ``di`` 0.5 + ``regress`` sequential, ``di`` 0.5 + ``bias``
  one-pass, ``l2`` 0.25 + ``lstsq`` one-pass (calibrated on the same 1,000 digits), compared on the logits of every
  held-out test digit the package ships (2,000): max |new - old| / max |old|, the top-1 of both, and the time of
  each ``recover`` call (indicative only on a shared machine).

Run from the repository root: ``python -m benchmarks.recovery_precision [--baseline 64eaa97]``; writes
``benchmarks/results/recovery_precision.json`` and ``.md``.
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
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "recovery_precision.json"
MODELS = {"cnn": "pipeline/assets/mnist_cnn.onnx", "vgg": "benchmarks/models/mnist_vgg.onnx",
          "resnet": "benchmarks/models/mnist_resnet.onnx", "mobilenet": "benchmarks/models/mnist_mobilenet.onnx",
          "inception": "benchmarks/models/mnist_inception.onnx"}
PLANS = (("di", 0.5), ("di", 0.25), ("l2", 0.5), ("l2", 0.25))
RECOVERIES = (("di", 0.25, "lstsq", True), ("di", 0.5, "regress", True), ("di", 0.5, "bias", False),
              ("l2", 0.25, "lstsq", False))


def _capture(root: Path, out: Path) -> None:
    """Plans and recovered logits with the code under ``root``."""
    sys.path.insert(0, str(root))
    import onnxruntime as ort

    from graph_ops.prune import apply_plan
    from pipeline.calibration.calibrate import calibrate
    from pipeline.data.named import open_dataset
    from pipeline.prune.orchestrate import keep_lists, prepare, score
    from pipeline.recovery import recover
    from pipeline.selection.allocate import select_channels

    out.mkdir(parents=True, exist_ok=True)
    calib = open_dataset("mnist", split="train", limit=1000)
    feeds, labels = next(open_dataset("mnist", split="test").batches(100_000))  # one batch: every test digit
    np.save(out / "labels.npy", np.asarray(labels))
    for name, rel in MODELS.items():
        prep = prepare(root / rel)
        stats = calibrate(prep, calib, pooling="gap", backend="ort-cpu", intra_op_threads=1, progress=False)
        plans = {f"{m}.{t}": select_channels(score(prep, stats, m, seed=0), prep.index, target_macs=t)
                 .with_sha(prep.sha256).to_json() for m, t in PLANS}
        (out / f"{name}.plans.json").write_text(json.dumps(plans, indent=1, sort_keys=True))
        for method, target, how, sequential in RECOVERIES:
            keep = keep_lists(select_channels(score(prep, stats, method, seed=0), prep.index, target_macs=target))
            start = time.perf_counter()
            model, _ = recover(prep.model, apply_plan(prep.model, prep.index, keep), prep.index, keep, calib,
                               method=how, sequential=sequential, backend="ort-cpu", intra_op_threads=1)
            seconds = time.perf_counter() - start
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            logits = session.run(None, {session.get_inputs()[0].name: next(iter(feeds.values()))})[0]
            stem = f"{name}.{method}.{target}.{how}.{int(sequential)}"
            np.save(out / f"{stem}.npy", logits)
            (out / f"{stem}.seconds").write_text(f"{seconds:.3f}")


def compare(old: Path, new: Path) -> dict[str, Any]:
    """Plan files compared as text; recovered logits by max relative difference and top-1."""
    labels = np.load(old / "labels.npy")
    result: dict[str, Any] = {"plans": {}, "recovered": {}}
    for path in sorted(old.glob("*.plans.json")):
        a, b = json.loads(path.read_text()), json.loads((new / path.name).read_text())
        result["plans"][path.name.split(".")[0]] = {"plans": len(a), "differ": [k for k in a if a[k] != b.get(k)]}
    for path in sorted(old.glob("*.npy")):
        if path.name == "labels.npy":
            continue
        a, b = np.load(path), np.load(new / path.name)
        seconds = [float((d / f"{path.stem}.seconds").read_text()) for d in (old, new)]
        result["recovered"][path.stem] = {
            "max_rel_diff": float(np.abs(a - b).max() / np.abs(a).max()),
            "top1_float64": round(float((a.argmax(1) == labels).mean() * 100), 2),
            "top1_float32": round(float((b.argmax(1) == labels).mean() * 100), 2),
            "argmax_agreement": round(float((a.argmax(1) == b.argmax(1)).mean() * 100), 2),
            "recover_s_float64": round(seconds[0], 2), "recover_s_float32": round(seconds[1], 2)}
    result["identical_plans"] = all(not v["differ"] for v in result["plans"].values())
    return result


def markdown(doc: dict[str, Any]) -> str:
    """The results table."""
    lines = [f"# Recovery precision: float32 per-batch products vs the float64 path ({doc['baseline']})", "",
             f"{doc['machine']['cpu']}, {doc['machine']['cores_available']} cores, shared with other jobs (times are "
             "indicative only). Plans byte-identical: " + ("yes" if doc["identical_plans"] else "NO") + ".", "",
             "| model.method.target.recovery.sequential | max rel. logit diff | top-1 float64 | top-1 float32 | "
             "argmax agreement % | recover s float64 / float32 |", "|---|---|---|---|---|---|"]
    for name, row in doc["recovered"].items():
        lines.append(f"| {name} | {row['max_rel_diff']:.2e} | {row['top1_float64']:.2f} | {row['top1_float32']:.2f} "
                     f"| {row['argmax_agreement']:.2f} | {row['recover_s_float64']:.1f} / {row['recover_s_float32']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Capture with both code bases (each in its own process) and compare."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="64eaa97")
    parser.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.capture:
        _capture(args.root, args.out)
        return
    from benchmarks.output import write_results
    from pipeline.deployment.bench import machine_info

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="diprune-precision-") as tmp:
        tree = Path(tmp) / "baseline"
        tree.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        for label, root in (("old", tree), ("new", ROOT)):
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--capture", "--root", str(root),
                            "--out", str(Path(tmp) / label)], cwd=root, check=True,
                           env={**env, "PYTHONPATH": str(root)})
        result = compare(Path(tmp) / "old", Path(tmp) / "new")
    doc = {"baseline": args.baseline, **result, "machine": machine_info()}
    print(write_results(args.out, doc, markdown))


if __name__ == "__main__":
    main()

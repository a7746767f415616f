"""YOLO end to end through the CLI: yolo11n (random weights, built from its YAML) at 0.5 of the MACs with ``l2`` from
unlabelled images, without and with ``lstsq`` recovery; output fidelity against the original and ORT CPU latency.

Usage::

    .venv/bin/python -m benchmarks.yolo_e2e [--size 640] [--calib 256] [--eval 64] [--work work/yolo_e2e]

Steps (every number in the results comes from these commands, run in-process through ``pipeline.cli.main``):

1. ``tests.production_models.build("yolo11n")`` exported with a dynamic batch, height and width (legacy exporter,
   checked against torch), so ``--input-shape input:1xCxSxS`` is required for a MACs budget.
2. Unlabelled images: ``--calib`` calibration and ``--eval`` held-out images, seeded random square crops (40-100 %
   of the shorter side, random horizontal flips) of the two photos shipped in the ``ultralytics`` package, resized
   to ``--size``; plain files in one folder each (no class sub-folders). YOLO's preprocessing: RGB in [0, 1]
   (``--mean 0 0 0 --std 1 1 1``).
3. ``diprune prune --method l2 --target-macs 0.5 --input-shape ... --recover none`` and ``--recover lstsq``.
4. ``diprune eval --reference`` of both pruned models against the original on the held-out images (relative
   error, cosine and max |difference| per output). The decoded ``(1, 84, A)`` output is dominated by the anchor
   grid (box centres in pixels) and, with random weights, by near-constant class probabilities, so the head's raw
   logits (the last convs of the box and class branches, exposed as extra outputs) are compared too, also centred
   per channel.
5. ``diprune bench`` on ORT CPU (batch 1, interleaved rounds): the original prepared at the same input shape
   (canonical, static: the same graph optimisations as the pruned models) against both pruned models.

Writes ``benchmarks/results/yolo_e2e.json`` and ``.md`` with the machine (``pipeline.deployment.bench.machine_info``). With
random weights the detector's outputs are not meaningful detections; fidelity to the original is what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.output import write_results

RESULTS = Path(__file__).resolve().parent / "results"


def _images(folder: Path, count: int, size: int, seed: int) -> Path:
    """Seeded square crops of the photos shipped with ultralytics (see the module docstring)."""
    import ultralytics
    from PIL import Image

    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sources = [Image.open(p).convert("RGB") for p in sorted((Path(ultralytics.__file__).parent / "assets").glob("*.jpg"))]
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = sources[int(rng.integers(len(sources)))]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.4, 1.0))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(folder / f"{i:04d}.jpg", quality=92)
    return folder


def _cli(*args: str) -> tuple[str, float]:
    """Run ``diprune`` in-process; return its stdout and wall seconds (a non-zero exit raises)."""
    from pipeline.cli import main

    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main(["-q", *args])
    if code:
        raise SystemExit(f"diprune {' '.join(args)} exited {code}")
    return out.getvalue(), time.perf_counter() - start


def _head_convs(static: Path) -> dict[str, list[str]]:
    """Output tensors of the detection head's last convs (raw logits before decoding): box (4 x 16 DFL bins) and
    class (80) branches, found as the frozen groups' Conv producers with 64 / 80 output channels."""
    from graph_ops.channels import analyze
    from graph_ops.io import load_model

    model = load_model(static)
    index = analyze(model)
    frozen = {p for g in index.groups if g.frozen for p in g.producers}
    heads: dict[str, list[str]] = {"box_logits": [], "class_logits": []}
    for node in model.graph.node:
        width = (index.shapes.get(node.output[0]) or (0, 0))[1]
        if node.op_type == "Conv" and node.name in frozen and width in (64, 80):
            heads["box_logits" if width == 64 else "class_logits"].append(node.output[0])
    return heads


def _parts(static: Path, pruned: Path, folder: Path, size: int) -> dict[str, dict[str, float]]:
    """Fidelity of the head's raw logits (box and class branches, each over all scales) on the folder's images:
    relative error and cosine of the logits, and of the logits centred per channel (their mean over the images and
    positions removed: how well the pruned model follows the variation with the image, not a constant offset)."""
    from graph_ops.io import load_model
    from graph_ops.probes import expose_tensors
    from pipeline.data.named import open_dataset
    from pipeline.model.runtime import make_session

    heads = _head_convs(static)
    names = [t for tensors in heads.values() for t in tensors]
    sessions = [make_session(expose_tensors(load_model(path), names).SerializeToString(), "ort-cpu")[0]
                for path in (static, pruned)]
    data = open_dataset(folder, size=size, crop=size, mean=(0, 0, 0), std=(1, 1, 1))
    got: dict[str, list[list[np.ndarray]]] = {t: [[], []] for t in names}
    for feeds, _ in data.batches(1):
        x = {"input": feeds["image"].astype(np.float32)}
        for k, session in enumerate(sessions):
            values = session.run(names, x)
            for t, v in zip(names, values, strict=True):
                got[t][k].append(v.astype(np.float64))
    out = {}
    for part, tensors in heads.items():
        ref = [np.concatenate(got[t][0]) for t in tensors]
        new = [np.concatenate(got[t][1]) for t in tensors]
        for centred in (False, True):
            b = np.concatenate([(r - r.mean(axis=(0, 2, 3), keepdims=True) if centred else r).ravel() for r in ref])
            a = np.concatenate([(n - n.mean(axis=(0, 2, 3), keepdims=True) if centred else n).ravel() for n in new])
            out[f"{part}{'_centred' if centred else ''}"] = {
                "relative_error": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))}
    return out


def run(size: int, calib: int, held_out: int, work: Path) -> dict:
    """Every step of the module docstring; returns the results document."""
    import torch

    from graph_ops.io import save_model
    from pipeline.deployment.bench import machine_info
    from pipeline.model.export import export_torch
    from pipeline.model.prepare import prepare
    from tests.production_models import build

    work.mkdir(parents=True, exist_ok=True)
    model = work / "yolo11n-dynamic.onnx"
    if not model.exists():
        example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        export_torch(build("yolo11n"), example, model, dynamo=False, dynamic_spatial=True, check=True)
    calib_dir, eval_dir = _images(work / "calib", calib, size, 0), _images(work / "eval", held_out, size, 1)
    shape = ["--input-shape", f"input:1x3x{size}x{size}"]
    data = ["--size", str(size), "--crop", str(size), "--mean", "0", "0", "0", "--std", "1", "1", "1"]
    static = work / "yolo11n-static.onnx"
    save_model(prepare(model, {"input": (1, 3, size, size)}).model, static)
    doc: dict = {"model": "yolo11n (ultralytics 8.4.190 YAML, random weights, randomised BN)", "input": [1, 3, size, size],
                 "calibration_images": calib, "eval_images": held_out, "method": "l2", "target_macs": 0.5,
                 "runs": {}}
    for recover in ("none", "lstsq"):
        out = work / f"yolo11n-l2-{recover}.onnx"
        _, seconds = _cli("prune", str(model), *shape, "--method", "l2", "--target-macs", "0.5", "--recover", recover,
                          "--data", str(calib_dir), *data, "-o", str(out))
        report = json.loads(Path(f"{out}.report.json").read_text())
        text, _ = _cli("eval", str(out), "--data", str(eval_dir), "--reference", str(model), *shape, *data)
        doc["runs"][recover] = {"prune_s": round(seconds, 1), "macs_fraction": report["macs_fraction"],
                                "params_fraction": report["params_fraction"], "timings_s": report["timings_s"],
                                "eval": json.loads(text)["outputs"],
                                "head": _parts(static, out, eval_dir, size)}
        print(recover, json.dumps(doc["runs"][recover]))
    bench_json = work / "bench.json"
    _cli("bench", str(static), str(work / "yolo11n-l2-none.onnx"), str(work / "yolo11n-l2-lstsq.onnx"), *shape,
         "--batch", "1", "--rounds", "5", "--duration", "10", "--warmup", "2", "--json", str(bench_json))
    bench = json.loads(bench_json.read_text())
    doc["bench"] = {"threads": bench["settings"].get("threads"),
                    "median_ms": {Path(r["model"]).name: round(1000 * r["latency"]["median_s"], 2)
                                  for r in bench["results"]},
                    "ratio_to_original": {Path(c["model"]).name: round(float(np.median(c["ratios"])), 3)
                                          for c in bench["comparisons"]}}
    doc["machine"] = machine_info()
    return doc


def markdown(doc: dict) -> str:
    """The results as a Markdown summary."""
    m = doc["machine"]
    lines = [f"# yolo11n at 0.5 of the MACs, l2, unlabelled images ({doc['input']})", "",
             f"Machine: {m['cpu']}, {m['cores_available']} cores available, onnxruntime "
             f"{m['versions'].get('onnxruntime')}. Calibration {doc['calibration_images']} images, evaluation "
             f"{doc['eval_images']} held-out images. Random weights: fidelity to the original is what is measured.", "",
             "Output: the CLI's `eval --reference` over the decoded (1, 84, A) output (boxes in pixels dominate its "
             "norm). Head: the last convs' raw logits before decoding (box DFL logits, class logits), also centred "
             "per channel (the mean over images and positions removed).", "",
             "| recovery | MACs | params | prune s | output rel. error | box logits rel. error (centred) | "
             "class logits rel. error (centred) | class logits cosine (centred) | latency ratio (ORT CPU, batch 1) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for recover, r in doc["runs"].items():
        out, head = next(iter(r["eval"].values())), r["head"]
        ratio = doc["bench"]["ratio_to_original"].get(f"yolo11n-l2-{recover}.onnx")
        lines.append(f"| {recover} | {r['macs_fraction']:.3f} | {r['params_fraction']:.3f} | {r['prune_s']} | "
                     f"{out['relative_error']:.3g} | {head['box_logits']['relative_error']:.3g} "
                     f"({head['box_logits_centred']['relative_error']:.3g}) | "
                     f"{head['class_logits']['relative_error']:.3g} "
                     f"({head['class_logits_centred']['relative_error']:.3g}) | "
                     f"{head['class_logits']['cosine']:.4f} ({head['class_logits_centred']['cosine']:.4f}) | "
                     f"{ratio} |")
    lines += ["", f"Median latency (ms): {doc['bench']['median_ms']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse arguments, run, write the JSON and the Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("work/yolo_e2e"))
    parser.add_argument("--out", type=Path, default=RESULTS / "yolo_e2e.json")
    args = parser.parse_args()
    doc = run(args.size, args.calib, args.eval, args.work)
    print(write_results(args.out, doc, markdown))


if __name__ == "__main__":
    main()

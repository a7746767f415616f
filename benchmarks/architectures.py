"""Architectures outside the test zoo, end to end: what a user bringing one of them gets today.

Usage::

    .venv/bin/python -m benchmarks.architectures [--models convnext_atto,...] [--cache work/arch]

For each timm architecture of :data:`MODELS` (none of them is in the test zoo; random weights with randomised
BatchNorm statistics at 1x3x64x64, ``tests.production_models.build``), in its own child process (a crash or a hang
of one model cannot stop the others; ``--timeout`` seconds each): export with the legacy exporter (checked against
torch), analyse and check exact surgery as ``benchmarks.production_report`` does (three seeded random plans against
the mask oracle, predicted == counted MACs), then the default job through ``pipeline.prune.orchestrate.PruneRun`` (the
code path of ``diprune prune``): 96 seeded standard-normal images with labels cycling through 10 classes, batch 32,
``--method di --target-macs 0.6 --recover lstsq``; the pruned, recovered model is checked with the full ONNX checker
and must run in onnxruntime. Recorded: prunable share, freeze reasons (Conv output channels per reason), exactness,
the plan's MACs fraction, refit and skipped layers (with the skip reasons), wall times, or the error that stopped
the model. Random weights say nothing about accuracy: this is about what the tool accepts and computes exactly. Not in the
list: LeViT (its attention biases are sized for 224 x 224, so its torch forward itself fails at 64 x 64). The ViT is
built for 64 x 64 (``img_size=64``).
Writes ``benchmarks/results/architectures.json`` and ``.md`` with the machine (``pipeline.deployment.bench.machine_info``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.output import write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("convnext_atto", "repvgg_a0", "dla34", "hrnet_w18_small", "dpn68", "rexnet_100", "cspresnet50",
          "resnest14d", "skresnet18", "ese_vovnet19b_dw", "mobilevit_xxs", "poolformer_s12",
          "mobileone_s0", "fastvit_t8", "lcnet_050", "tinynet_a", "efficientnet_lite0", "nf_resnet26", "gernet_s",
          "selecsls42b", "cs3darknet_s", "edgenext_xx_small", "efficientvit_b0", "ghostnet_100", "semnasnet_050",
          "xception41", "vit_tiny_patch16_224")
IMAGES, BATCH, TARGET = 96, 32, 0.6


def child(name: str, cache: Path, work: Path) -> dict[str, Any]:
    """One model, in this process: export, analysis and exactness, then the prune."""
    import onnx
    import onnxruntime as ort

    from benchmarks.production_report import report_one
    from graph_ops.channels import analyze
    from graph_ops.io import load_model
    from pipeline.data.datasets import from_iterable
    from pipeline.prune.orchestrate import PruneRun
    from tests.production_models import export_production, input_shape

    row: dict[str, Any] = {"model": name}
    try:
        row.update(report_one(name, "legacy", cache))
        path = export_production(name, "legacy", cache)
        index = analyze(load_model(path))
        row["last_axis_groups"] = sum(g.prunable and any(p in index.last_axis for p in g.probes)
                                      for g in index.groups)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((IMAGES, *input_shape(name)[1:])).astype(np.float32)
        y = np.arange(IMAGES) % 10
        data = from_iterable([(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, IMAGES, BATCH)], name="gaussian")
        start = time.perf_counter()
        run = PruneRun(path, data, batch_size=BATCH, backend="ort-cpu", progress=False, work_dir=work)
        run.stats()
        plan = run.plan(run.scores("di"), target_macs=TARGET)
        model, recovery = run.recover(run.apply(plan), plan, "lstsq")
        onnx.checker.check_model(model, full_check=True)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: x[:2]})
        row.update({"prune": "ok", "prune_s": round(time.perf_counter() - start, 1),
                    "macs_fraction": round(float(plan.meta["macs_fraction"]), 3),
                    "refit_layers": len(recovery.get("consumers", [])),
                    "skipped_layers": _reasons([why for _, why in recovery.get("skipped", [])])})
    except Exception as err:  # the report records what stopped a model and goes on with the next
        row["error"] = f"{type(err).__name__}: {err}"[:400]
    return row


def _reasons(texts: list[str]) -> dict[str, int]:
    """Reasons with quoted names dropped, counted."""
    counts: dict[str, int] = {}
    for text in texts:
        key = re.sub(r"'[^']*'", "'…'", text)
        counts[key] = counts.get(key, 0) + 1
    return counts


def markdown(doc: dict[str, Any]) -> str:
    """The results table."""
    m = doc["machine"]
    lines = ["# Architectures outside the test zoo, end to end", "",
             f"Machine: {m['cpu']} ({m['cores_available']} cores), onnxruntime {m['versions'].get('onnxruntime')}, "
             f"torch {m['versions'].get('torch')}, timm {doc['timm']}. Produced by `python -m benchmarks.architectures`.",
             "", f"timm models with random weights at 1x3x64x64, legacy exporter; prune = `--method di --target-macs "
             f"{TARGET} --recover lstsq` on {IMAGES} Gaussian images (10 cycling labels), batch {BATCH}.", "",
             "| model | groups (prunable) | last-axis groups | prunable Conv share | exact (worst rel. err) | MACs kept | "
             "refit / skipped layers | prune s | frozen Conv channels: reason | skipped: reason | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["models"]:
        frozen = "; ".join(f"{n}: {why}" for why, n in list(r.get("frozen_conv_channels", {}).items())[:2])
        skipped = r.get("skipped_layers", {})
        skip = "; ".join(f"{n}: {why[:70]}" for why, n in list(skipped.items())[:2])
        share = f"{r['prunable_share']:.3f}" if "prunable_share" in r else ""
        exact = f"{r['worst_relative_error']:.2g}" if "worst_relative_error" in r else ""
        groups = f"{r['groups']} ({r['prunable_groups']})" if "groups" in r else ""
        lines.append(f"| {r['model']} | {groups} | {r.get('last_axis_groups', '')} | {share} | {exact} | "
                     f"{r.get('macs_fraction', '')} | "
                     f"{r.get('refit_layers', '')}{' / ' + str(sum(skipped.values())) if 'refit_layers' in r else ''} "
                     f"| {r.get('prune_s', '')} | {frozen} | {skip} | {r.get('error', '')[:160]} |")
    ok = sum(r.get("prune") == "ok" for r in doc["models"])
    lines += ["", f"{ok} of {len(doc['models'])} models pruned and recovered end to end.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run every model in a child process; write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--cache", type=Path, default=ROOT / "work" / "arch")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "architectures.json")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.child:
        import logging

        logging.basicConfig(level=logging.ERROR)
        print(json.dumps(child(args.child, args.cache, args.cache)))
        return
    from importlib.metadata import version

    from pipeline.deployment.bench import machine_info

    rows = []
    for name in args.models.split(","):
        command = [sys.executable, "-m", "benchmarks.architectures", "--child", name, "--cache", str(args.cache)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
            lines = done.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                "model": name, "error": f"child exited {done.returncode}: {done.stderr.strip()[-300:]}"}
        except subprocess.TimeoutExpired:
            row = {"model": name, "error": f"timed out after {args.timeout} s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {"models": rows, "timm": version("timm"), "machine": machine_info()}
    print(write_results(args.out, doc, markdown))


if __name__ == "__main__":
    main()

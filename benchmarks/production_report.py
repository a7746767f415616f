"""Channel groups of production architectures: prunable share, refinement, grouped blocks, freeze reasons, exactness.

Usage::

    .venv/bin/python -m benchmarks.production_report [--cache work/prod] [--models yolo11n,...] [--exporters legacy]

For each model of ``tests.production_models.PRODUCTION`` (timm regnety_002, resnext50_32x4d, mixnet_m,
ghostnetv2_100, cspdarknet53, res2net50_14w_8s at 1x3x64x64; Ultralytics yolov8n and yolo11n built from their YAML
at 1x3x160x160; random weights, randomised BatchNorm statistics) and each exporter (the dynamo exporter fails on the
Ultralytics models with torch 2.13: recorded as the error), export once into ``--cache``, run
``graph_ops.channels.analyze`` and record: groups, prunable groups, groups that are pieces of a refined space
(``id[a:b]``), groups in equal blocks (grouped convolutions), the share of Conv output channels that are prunable,
the frozen Conv output channels with their reasons (node and tensor names dropped), and an exactness check: three
seeded random plans applied (full checker) against the mask oracle (worst output error relative to the largest
output) with predicted == counted MACs. Writes ``benchmarks/results/production_groups.json`` and ``.md`` with the
machine (``pipeline.deployment.bench.machine_info``).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from benchmarks.output import write_results
from graph_ops.groups import ChannelGroupIndex

RESULTS = Path(__file__).resolve().parent / "results"


def _frozen_channels(model: onnx.ModelProto, index: ChannelGroupIndex) -> dict[str, int]:
    """Frozen Conv output channels per reason (names in quotes dropped)."""
    groups, counts = index.by_id, Counter[str]()
    for node in model.graph.node:
        if node.op_type == "Conv" and node.output[0] in index.by_tensor:
            for seg in index.by_tensor[node.output[0]]:
                reason = groups[seg.group_id].frozen
                if reason:
                    counts[re.sub(r"'[^']*'", "'…'", reason)] += seg.length
    return dict(counts.most_common())


def _exactness(model: onnx.ModelProto, index: ChannelGroupIndex) -> dict[str, object]:
    from tests.oracles import check_exact_surgery, random_feeds

    worst, equal = check_exact_surgery(model, index, random_feeds(model, np.random.default_rng(0), batch=1))
    return {"worst_relative_error": float(f"{worst:.3g}"), "predicted_equals_counted": equal}


def report_one(name: str, exporter: str, cache: Path) -> dict[str, object]:
    """Export (cached), analyse, check and summarise one model."""
    from graph_ops.channels import analyze, prunable_share
    from graph_ops.io import load_model
    from tests.production_models import export_production

    start = time.perf_counter()
    path = export_production(name, exporter, cache)
    export_s = time.perf_counter() - start
    model = load_model(path)
    start = time.perf_counter()
    index = analyze(model)
    analyze_s = time.perf_counter() - start
    return {
        "model": name, "exporter": exporter, "groups": len(index.groups),
        "prunable_groups": sum(g.prunable for g in index.groups),
        "refined_pieces": sum("[" in g.id for g in index.groups),
        "blocked_groups": sum(g.blocks > 1 for g in index.groups),
        "prunable_share": round(prunable_share(model, index), 4),
        "frozen_conv_channels": _frozen_channels(model, index),
        "unknown_macs_nodes": len(index.unknown_macs),
        **_exactness(model, index),
        "export_s": round(export_s, 1), "analyze_s": round(analyze_s, 3),
    }


def markdown(doc: dict) -> str:
    """The results table."""
    m = doc["machine"]
    lines = [f"Machine: {m['cpu']} ({m['cores_available']} cores), onnxruntime {m['versions'].get('onnxruntime')}, "
             f"torch {m['versions'].get('torch')}.", "",
             "| model | exporter | groups (prunable) | refined pieces | blocked groups | prunable share | frozen Conv "
             "channels: reason | exact (worst rel. err) | MACs predicted == counted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["models"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['exporter']} | export failed: {r['error'][:90]} | | | | | | |")
            continue
        frozen = "; ".join(f"{n}: {reason}" for reason, n in r["frozen_conv_channels"].items())
        lines.append(f"| {r['model']} | {r['exporter']} | {r['groups']} ({r['prunable_groups']}) | "
                     f"{r['refined_pieces']} | {r['blocked_groups']} | {r['prunable_share']:.3f} | {frozen} | "
                     f"{r['worst_relative_error']:.2g} | {r['predicted_equals_counted']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse arguments, build the report, print one line per model and write the JSON and the Markdown."""
    from pipeline.deployment.bench import machine_info
    from tests.production_models import EXPORTERS, PRODUCTION

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("work/prod"))
    parser.add_argument("--models", default=",".join(PRODUCTION))
    parser.add_argument("--exporters", default=",".join(EXPORTERS))
    parser.add_argument("--out", type=Path, default=RESULTS / "production_groups.json")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        for exporter in args.exporters.split(","):
            try:
                row = report_one(name, exporter, args.cache)
            except Exception as err:  # a report keeps going past one broken export and says why
                row = {"model": name, "exporter": exporter, "error": f"{type(err).__name__}: {err}"[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    doc = {"machine": machine_info(), "models": rows}
    print(write_results(args.out, doc, markdown))


if __name__ == "__main__":
    main()

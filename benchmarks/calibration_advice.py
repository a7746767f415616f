"""How many calibration images to use, per model: :func:`pipeline.prune.advice.sample_advice` on the shipped and benchmark
models and on torchvision classifiers at 224x224 (random weights: the advice depends on the architecture only).

Run from the repository root (exports the torchvision models into ``work/cost`` once; needs the ``[torch]`` extra)::

    python -m benchmarks.calibration_advice     # writes benchmarks/results/calibration_advice.{json,md}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.output import torchvision_onnx
from graph_ops.io import atomic_write_bytes
from pipeline.model.prepare import prepare
from pipeline.prune.advice import sample_advice

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LOCAL = {"demo CNN": "pipeline/assets/mnist_cnn.onnx", **{f"MNIST {f}": f"benchmarks/models/mnist_{f}.onnx"
                                                        for f in ("vgg", "resnet", "mobilenet", "inception", "lenet")}}
TORCHVISION = ("resnet18", "resnet50", "mobilenet_v2", "vgg16")


def main() -> int:
    """Advice for every model, as JSON and a markdown table."""
    paths = {name: ROOT / path for name, path in LOCAL.items()}
    paths.update({f"torchvision {name} (224x224)": torchvision_onnx(name, ROOT / "work" / "cost") for name in TORCHVISION})
    doc = {}
    for name, path in paths.items():
        prepared = prepare(path)
        doc[name] = {"params": int(prepared.cost.params), **sample_advice(prepared).to_dict()}
        print(name, doc[name], file=sys.stderr)
    lines = ["# Advised calibration images (`python -m benchmarks.calibration_advice`)", "",
             "From the analysis alone (`pipeline.prune.advice.sample_advice`, `auto` pooling, 64 sampled positions per "
             "image): scoring wants 10 images per feature of the widest probe; lstsq recovery 10 rows per unknown of "
             "the most demanding refit layer (unknowns at the unpruned width). Layers above 5,000 unknowns get R2.", "",
             "| model | params | scoring: images (widest probe features) | lstsq: images (layer unknowns, rows per "
             "image) | layers left to R2 |", "|---|---|---|---|---|"]
    for name, a in doc.items():
        lstsq = (f"{a['recovery_images']:,} ({a['layer_unknowns']}, {a['rows_per_image']})" if a["hardest_layer"]
                 else "no layer refit by R3")
        lines.append(f"| {name} | {a['params'] / 1e6:.1f} M | {a['scoring_images']:,} ({a['probe_features']}) | "
                     f"{lstsq} | {len(a['r2_layers'])} |")
    atomic_write_bytes(RESULTS / "calibration_advice.json", json.dumps(doc, indent=1, sort_keys=True).encode())
    atomic_write_bytes(RESULTS / "calibration_advice.md", ("\n".join(lines) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

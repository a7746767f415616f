"""Channel-group report over the torchvision zoo: groups, prunable share and freeze reasons per model and exporter.

Usage::

    .venv/bin/python -m benchmarks.zoo_report [--cache work/zoo] [--models resnet18,resnet50] [--exporters legacy]

Exports each model once into ``--cache`` (``tests.models.export_zoo``: canonical, 10 classes, small inputs), runs
``graph_ops.channels.analyze`` and writes ``benchmarks/results/zoo_groups.json``. The prunable share is the share of
Conv output channels, summed over every Conv node, that belong to prunable groups. Freeze reasons are histogrammed
after dropping node and tensor names (the text inside quotes).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import time
from collections import Counter
from pathlib import Path

from graph_ops.channels import analyze, prunable_share
from graph_ops.io import load_model
from tests.models import EXPORTERS, ZOO, export_zoo

RESULTS = Path(__file__).resolve().parent / "results" / "zoo_groups.json"


def reason_kind(reason: str) -> str:
    """A freeze reason without the node / tensor names it mentions."""
    return re.sub(r"'[^']*'", "'…'", reason)


def report_one(name: str, exporter: str, cache: Path) -> dict[str, object]:
    """Export (cached), analyse and summarise one model."""
    start = time.perf_counter()
    path = export_zoo(name, exporter, cache)
    export_s = time.perf_counter() - start
    model = load_model(path)
    start = time.perf_counter()
    index = analyze(model)
    analyze_s = time.perf_counter() - start
    frozen = [g for g in index.groups if g.frozen]
    return {
        "model": name, "exporter": exporter, "groups": len(index.groups), "frozen": len(frozen),
        "prunable_share": round(prunable_share(model, index), 4),
        "frozen_reasons": dict(sorted(Counter(reason_kind(g.frozen) for g in frozen).items())),
        "export_s": round(export_s, 2), "analyze_s": round(analyze_s, 3),
    }


def main() -> None:
    """Parse arguments, build the report, print one line per model and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("work/zoo"))
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--exporters", default=",".join(EXPORTERS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        for exporter in args.exporters.split(","):
            try:
                row = report_one(name, exporter, args.cache)
            except Exception as err:  # a report keeps going past one broken model and says why
                row = {"model": name, "exporter": exporter, "error": f"{type(err).__name__}: {err}"[:300]}
            rows.append(row)
            print(json.dumps(row))
    machine = {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "models": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

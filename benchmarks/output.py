"""What benchmarks share: the seeded torchvision models they export, and writing their results (``NAME.json``, the
data, and ``NAME.md``, its table, both at once)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graph_ops.io import atomic_write_files


def torchvision_onnx(name: str, work: Path) -> Path:
    """The torchvision model ``name`` with seeded random weights (``pipeline.export.load_torchvision``; no pretrained
    weights can be downloaded here) at 1x3x224x224, exported once to ``work/NAME.onnx`` (``export_torch``)."""
    path = work / f"{name}.onnx"
    if not path.is_file():
        import torch

        from pipeline.export import export_torch, load_torchvision

        work.mkdir(parents=True, exist_ok=True)
        export_torch(load_torchvision(name, seed=0), torch.randn(1, 3, 224, 224), path)
    return path


def write_results(out: Path, doc: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> str:
    """Write ``doc`` to ``out`` (JSON) and ``markdown(doc)`` beside it as ``.md``, atomically; return the text."""
    text = markdown(doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_files({out: (json.dumps(doc, indent=1) + "\n").encode(), out.with_suffix(".md"): text.encode()})
    return text

"""What benchmarks share: the seeded torchvision models they export, writing their results (``NAME.json``, the
data, and ``NAME.md``, its table, both at once), and the start of a long benchmark's ``main`` (its log on stderr,
the markdown re-rendered from the JSON, the command line it records)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from graph_ops.io import atomic_write_bytes, atomic_write_files


def torchvision_onnx(name: str, work: Path) -> Path:
    """The torchvision model ``name`` with seeded random weights (``pipeline.model.export.load_torchvision``; no pretrained
    weights can be downloaded here) at 1x3x224x224, exported once to ``work/NAME.onnx`` (``export_torch``)."""
    path = work / f"{name}.onnx"
    if not path.is_file():
        import torch

        from pipeline.model.export import export_torch, load_torchvision

        work.mkdir(parents=True, exist_ok=True)
        export_torch(load_torchvision(name, seed=0), torch.randn(1, 3, 224, 224), path)
    return path


def write_results(out: Path, doc: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> str:
    """Write ``doc`` to ``out`` (JSON) and ``markdown(doc)`` beside it as ``.md``, atomically; return the text."""
    text = markdown(doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_files({out: (json.dumps(doc, indent=1) + "\n").encode(), out.with_suffix(".md"): text.encode()})
    return text


def log_to_stderr(library_level: int = logging.WARNING) -> None:
    """The benchmark's INFO lines on stderr with their time; the library's own loggers (``graph_ops``,
    ``pipeline``) only from ``library_level`` up."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("graph_ops", "pipeline"):
        logging.getLogger(name).setLevel(library_level)


def rewrite_markdown(out: Path, render: Callable[[dict[str, Any]], str | Sequence[str]]) -> None:
    """``out``'s ``.md`` written again from its JSON (``render``: the text, or its lines), atomically."""
    text = render(json.loads(out.read_text()))
    atomic_write_bytes(out.with_suffix(".md"), (text if isinstance(text, str) else "\n".join(text)).encode())


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command a results file records: ``python -m MODULE ARGS`` (``argv`` None: this process's arguments)."""
    return " ".join([f"python -m {module}", *(sys.argv[1:] if argv is None else argv)])

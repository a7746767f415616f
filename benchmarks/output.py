"""Writing a benchmark's results: ``NAME.json`` (the data) and ``NAME.md`` (its table), both at once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graph_ops.io import atomic_write_files


def write_results(out: Path, doc: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> str:
    """Write ``doc`` to ``out`` (JSON) and ``markdown(doc)`` beside it as ``.md``, atomically; return the text."""
    text = markdown(doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_files({out: (json.dumps(doc, indent=1) + "\n").encode(), out.with_suffix(".md"): text.encode()})
    return text

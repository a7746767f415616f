"""Graph analysis and rewrite passes over ONNX models (never imports ``pipeline``).

``PASSES`` maps a pass name to its function (``graph_ops.passes`` describes the protocol); ``CANONICALIZE`` is the
default canonicalization order used by :func:`graph_ops.canonicalize.canonicalize`. Both live in
:mod:`graph_ops.canonicalize` and are re-exported here, loaded on first use: importing a light submodule
(``graph_ops.errors``) does not load onnx.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CANONICALIZE", "PASSES"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from graph_ops import canonicalize

        return getattr(canonicalize, name)
    raise AttributeError(f"module 'graph_ops' has no attribute {name!r}")

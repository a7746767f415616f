"""Graph analysis and rewrite passes over ONNX models (never imports ``pipeline``).

``PASSES`` maps a pass name to its function (``graph_ops.passes`` describes the protocol); ``CANONICALIZE`` is the
default canonicalization order used by :func:`graph_ops.canonicalize.canonicalize`. Both live in
:mod:`graph_ops.canonicalize` and are re-exported here.
"""

from __future__ import annotations

from graph_ops.canonicalize import CANONICALIZE, PASSES

__all__ = ["CANONICALIZE", "PASSES"]

"""Graph analysis and rewrite passes over ONNX models (never imports ``pipeline``).

``PASSES`` maps a pass name to its function (``graph_ops.passes`` describes the protocol); ``CANONICALIZE`` is the
default canonicalization order used by :func:`graph_ops.canonicalize.canonicalize`.
"""

from __future__ import annotations

from graph_ops.canonicalize import (
    fold_constants,
    fuse_batchnorm,
    materialize_bias,
    name_nodes,
    remove_identity,
)
from graph_ops.passes import GraphPass

PASSES: dict[str, GraphPass] = {
    "fold_constants": fold_constants,
    "remove_identity": remove_identity,
    "name_nodes": name_nodes,
    "fuse_batchnorm": fuse_batchnorm,
    "materialize_bias": materialize_bias,
}

CANONICALIZE: tuple[str, ...] = ("fold_constants", "remove_identity", "name_nodes", "fuse_batchnorm", "materialize_bias")

"""``diprune export``: a torch model named by a spec exported to a canonical ONNX file and checked against torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graph_ops.errors import UserInputError
from pipeline.cli.common import (
    _emit,
    _non_negative,
    _positive_int,
    _shapes,
)
from pipeline.cli.options import (
    _add_input_shape,
)


def _export_shape(args: argparse.Namespace) -> tuple[str | None, tuple[int, ...] | None]:
    """``export``/``push``: the one example input of ``--input-shape [NAME:]DIMS`` as (name or None, dims)."""
    shapes = _shapes(args)
    if len(shapes) > 1:
        raise UserInputError(f"--input-shape was given for {len(shapes)} inputs; a torch export takes one example "
                             "input: give --input-shape once")
    if not shapes:
        return None, None
    name, dims = next(iter(shapes.items()))
    return name or None, dims


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.model.export_spec import export_spec

    name, shape = _export_shape(args)
    result = export_spec(args.spec, Path(args.output), input_shape=shape, input_name=name, opset=args.opset,
                         dynamic_batch=args.dynamic_batch, exporter=args.exporter, rtol=args.rtol, atol=args.atol)
    _emit(args, result.parity.summary())
    _emit(args, result.summary())
    return 0


def _add_export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="torchvision:NAME, timm:NAME (timm installed) or path/to/file.py:FACTORY (a function "
                                "returning a torch.nn.Module)")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    _add_input_shape(p, export=True)
    p.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (the dynamo exporter uses >= 18)")
    p.add_argument("--dynamic-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="symbolic batch dimension (calibration and evaluation run in batches)")
    p.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo", help="torch exporter")
    p.add_argument("--rtol", type=_non_negative, default=1e-3, help="parity check: relative tolerance")
    p.add_argument("--atol", type=_non_negative, default=1e-4, help="parity check: absolute tolerance")

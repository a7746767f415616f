"""``diprune latency``: latency models from the user's own board (``variants`` writes the models and the
profiling commands, ``fit`` reads the profiles back).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.choices import (
    BACKENDS,
    PRECISIONS,
)
from pipeline.cli.common import (
    _emit,
    _non_negative_int,
    _positive_int,
    _round_to,
    _shapes,
)
from pipeline.cli.options import (
    _add_input_shape,
    _HelpFormatter,
)


def cmd_latency(args: argparse.Namespace) -> int:
    if args.latency_command == "variants":
        from pipeline.deployment.device_profiles import write_variants
        from pipeline.deployment.latency_model import LatencyTarget
        from pipeline.model.prepare import prepare

        target = LatencyTarget(backend=args.backend, precision=args.precision, batch=args.latency_batch,
                               variants=args.variants, seed=args.seed)
        manifest = write_variants(prepare(args.model, _shapes(args)), args.output, target,
                                  round_to=_round_to(args), min_channels=args.min_channels)
        _emit(args, f"wrote {len(manifest['variants'])} variants to {args.output}: run {args.output}/run_trtexec.sh "
                    f"(or run_onnxruntime.sh) on the board, copy its profiles/ folder back, then: diprune latency fit "
                    f"{args.output}")
        return 0
    from graph_ops.io import atomic_write_bytes, check_writable
    from pipeline.deployment.device_profiles import fit_board_profiles

    out = check_writable(args.output or str(Path(args.folder) / "latency_model.json"))
    model = fit_board_profiles(args.folder, source=args.source, block=args.block)
    atomic_write_bytes(out, model.to_json().encode())
    _emit(args, f"wrote {out}: {model.summary()} ({model.key['source']}, device {model.key['device']})")
    return 0


def _add_latency_command(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """latency variants | fit."""
    latency = parser.add_subparsers(dest="latency_command", required=True, metavar="STEP",
                                    help="variants (models to time on the board) or fit (their profiles)")
    p = latency.add_parser("variants", parents=[common], formatter_class=_HelpFormatter,
                           help="write random-width variants of a model and the board scripts that profile them")
    p.add_argument("model", help="the .onnx file whose variants the board times")
    p.add_argument("-o", "--output", required=True, help="the folder to write (variants.json, variant_NNN.onnx, "
                                                         "run_trtexec.sh, run_onnxruntime.sh)")
    p.add_argument("--variants", type=_positive_int, default=12, help="random-width variants (default 12; plus "
                                                                      "the full model and 3 held-out ones)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the variants' random widths")
    p.add_argument("--backend", choices=BACKENDS, default="tensorrt",
                   help="the board's runtime: picks the onnxruntime provider of run_onnxruntime.sh and --round-to")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="trtexec precision flags")
    p.add_argument("--latency-batch", type=_positive_int, default=1, help="batch size the board times")
    p.add_argument("--round-to", type=_positive_int, default=None,
                   help="variant widths are multiples of N (default: from --backend/--precision)")
    p.add_argument("--min-channels", type=_positive_int, default=8, help="never fewer channels in a group")
    _add_input_shape(p)
    p = latency.add_parser("fit", parents=[common], formatter_class=_HelpFormatter,
                           help="fit a latency model on the board's profiles")
    p.add_argument("folder", help="the variants folder, with the board's profiles/ copied back")
    p.add_argument("-o", "--output", default=None, help="the latency model file (default FOLDER/latency_model.json)")
    p.add_argument("--source", choices=("trtexec", "onnxruntime"), default=None,
                   help="which profiles to read (default: the kind present)")
    p.add_argument("--block", type=_positive_int, default=1,
                   help="channel block of the board's layout: widths are rounded up to it (default 1: none)")

"""The ``diprune`` command line: one subcommand per public function, no logic of its own.

Exit codes: 0 success, 1 error (bad input, unsupported model, ...), 2 usage (also every number that makes no sense),
3 verification failed (``export``: the parity check; ``run``: no candidate passes every gate), 130 interrupted
(SIGINT), 143 terminated (SIGTERM; cleaned up like SIGINT: temporary files removed, inputs intact).
User errors print one line ``diprune: error: ...`` on stderr, never a traceback. Only a command's result goes to
stdout (``--json`` output is pure JSON): whatever libraries print while it runs (onnx-graphsurgeon's ``[W]``
warnings) is routed to stderr, like the logs.

Every output path is checked before any work by one guard (:func:`pipeline.cli.guard._check_outputs`, built on
:func:`graph_ops.io.check_writable`): never one of the command's inputs (model, data, reference, plan, scores,
statistics, task map, torch spec file, latency cache), never a device node or FIFO, a name the file system takes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from graph_ops.errors import PruneError
from pipeline.cli.export import _add_export_options, cmd_export
from pipeline.cli.guard import Terminated, _check_outputs, _sigterm_unwinds
from pipeline.cli.latency import _add_latency_command, cmd_latency
from pipeline.cli.measure import _add_measure_commands, cmd_bench, cmd_demo, cmd_eval, cmd_run
from pipeline.cli.oneshot import _add_prune_command, cmd_prune
from pipeline.cli.options import _add_input_shape, _add_verbosity, _HelpFormatter, _version
from pipeline.cli.stages import (
    _add_model_commands,
    cmd_apply,
    cmd_calibrate,
    cmd_inspect,
    cmd_plan,
    cmd_score,
)
from pipeline.cli.training import _add_finetune_options, _add_push_options, cmd_finetune, cmd_push
from pipeline.memory import no_huge_page_advice

logger = logging.getLogger("diprune")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "export": (cmd_export, "export a torch model (torchvision:NAME, timm:NAME, file.py:FACTORY) to canonical ONNX, "
                           "checked against torch"),
    "inspect": (cmd_inspect, "channel groups, sizes, freeze reasons, MACs and params"),
    "apply": (cmd_apply, "apply a plan file: remove channels (or zero them with --mask-only)"),
    "calibrate": (cmd_calibrate, "stream per-channel statistics of labelled data through onnxruntime"),
    "score": (cmd_score, "score channels with a registered method"),
    "plan": (cmd_plan, "choose kept channels to meet a MACs or params budget"),
    "prune": (cmd_prune, "one shot: calibrate, score, plan, apply, report"),
    "finetune": (cmd_finetune, "distil the original into a pruned model for a few epochs (needs the [torch] "
                               "extra); same graph, new weights"),
    "push": (cmd_push, "Grow-Push-Prune's push (train features towards class separation in few channels), then "
                       "prune with DI and recover (needs the [torch] extra)"),
    "eval": (cmd_eval, "top-1/top-5 (dense outputs: exact/CER, mIoU, mAP) on held-out data, agreement with a "
                       "reference model"),
    "bench": (cmd_bench, "latency of one or more models, interleaved rounds"),
    "demo": (cmd_demo, "prune the shipped MNIST model with DI and show what was gained"),
    "latency": (cmd_latency, "latency models from your own board: 'variants' writes the models and the trtexec / "
                             "onnxruntime script to run there, 'fit' reads the profiles back into a latency "
                             "model for --latency-model"),
    "run": (cmd_run, "the whole job from a YAML config: candidates, evaluation, latency, gates, report, "
                     "best.onnx (exit 3 when no candidate passes)"),
}
"""Subcommand -> (function, help)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; subcommand choices come from the registries."""
    parser = argparse.ArgumentParser(prog="diprune", description=__doc__.splitlines()[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"diprune {_version()}",
                        help="print the version and exit")
    _add_verbosity(parser, default=True)
    common = argparse.ArgumentParser(add_help=False)  # -v/-q after the subcommand too
    _add_verbosity(common, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=text, description=text, parents=[common],
                                    formatter_class=_HelpFormatter)
               for name, (_, text) in COMMANDS.items()}
    for name, (func, _) in COMMANDS.items():
        parsers[name].set_defaults(func=func)
    _add_export_options(parsers["export"])
    _add_model_commands(parsers)
    _add_prune_command(parsers["prune"])
    _add_finetune_options(parsers["finetune"])
    _add_push_options(parsers["push"])
    _add_measure_commands(parsers)
    _add_latency_command(parsers["latency"], common)
    for name in ("inspect", "calibrate", "score", "plan", "apply", "prune", "eval", "bench"):
        _add_input_shape(parsers[name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    level = logging.ERROR if args.quiet else level
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args.stdout = sys.stdout
    with contextlib.suppress(AttributeError, ValueError):  # a file name that is not UTF-8 is printed, not a traceback
        sys.stdout.reconfigure(errors="backslashreplace")
    no_huge_page_advice()
    try:
        with _sigterm_unwinds(), contextlib.redirect_stdout(sys.stderr):  # only the result goes to stdout
            _check_outputs(args)
            return args.func(args)
    except PruneError as err:
        print(f"diprune: error: {err}", file=sys.stderr)
        return err.exit_code
    except Terminated:
        print("diprune: terminated (SIGTERM); temporary files removed, inputs untouched", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("diprune: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("diprune: error: out of memory; use smaller batches (--batch, --batch-size) or fewer samples (--limit)",
              file=sys.stderr)
        return 1
    except BrokenPipeError:  # stdout closed early (diprune ... | head): not an error of ours, no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


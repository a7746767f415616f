"""The one guard every command passes before any work (output paths checked against the inputs, device nodes and
FIFOs, by :func:`graph_ops.io.check_writable`), and SIGTERM unwound like SIGINT (temporary files removed).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from graph_ops.errors import UserInputError

_INPUT_OPTIONS = ("config", "spec", "model", "models", "reference", "plan", "stats", "scores", "data", "eval_data",
                  "labels_path", "eval_labels_path", "task_map", "latency_model")
"""Options naming files (or folders) a command reads: no output may be one of them, or lie inside one."""


def _input_paths(args: argparse.Namespace) -> list[str]:
    """Every file or folder the command reads, as given (``mnist`` is the shipped file; a torch spec
    ``file.py:FACTORY`` its file; ``finetune``'s default plan ``<model>.plan.json``; a used latency cache; the
    package's data folder, always)."""
    from pipeline.data.datasets import mnist_path

    paths: list[str] = []
    for name in _INPUT_OPTIONS:
        value = getattr(args, name, None)
        for item in value if isinstance(value, list) else [value]:
            if not item:
                continue
            file, _, _ = str(item).rpartition(":")
            if name in ("data", "eval_data") and item == "mnist":
                paths.append(str(mnist_path()))
            elif name in ("spec", "model") and file.endswith(".py"):
                paths.append(file)
            else:
                paths.append(str(item))
    if args.command == "finetune" and args.plan is None:
        paths.append(f"{args.model}.plan.json")
    paths.append(str(mnist_path().parent))  # the package's own data (the shipped model and digits) is never written
    if getattr(args, "target_latency", None) is not None and args.latency_cache:
        paths.append(args.latency_cache)
    return paths


def _output_paths(args: argparse.Namespace) -> list[str]:
    """Every file the command writes (``run`` writes a folder: :func:`pipeline.job.output.check_run_paths`)."""
    out = getattr(args, "output", None)
    if args.command in ("run", "demo", "inspect", "eval"):
        return []
    if args.command == "latency":  # variants: a folder of new files; fit: its model file, FOLDER/... by default
        return [out or str(Path(args.folder) / "latency_model.json")] if args.latency_command == "fit" else []
    if args.command == "bench":
        return [args.json] if args.json else []
    if args.command == "prune":
        from pipeline.deployment.fp16 import fp16_path
        from pipeline.deployment.int8_stage import int8_path

        return [out, f"{out}.plan.json", f"{out}.report.json", *([str(int8_path(out))] if args.quantize else []),
                *([str(fp16_path(out))] if args.precision == "fp16" else [])]
    if args.command == "finetune":
        return [out, f"{out}.report.json"]
    if args.command == "push":
        from pipeline.training.push import default_pushed_path

        pushed = args.pushed or str(default_pushed_path(out))
        return [out, f"{out}.plan.json", f"{out}.report.json", pushed, f"{pushed}.push.json"]
    return [out]


def _check_outputs(args: argparse.Namespace, extra_inputs: Sequence[str] = ()) -> None:
    """The one guard of every command's outputs, before any work: none is an input (or inside an input folder), a
    device node or FIFO, an overlong name or in a folder that takes no new file; a used ``--latency-cache`` takes
    new files."""
    from graph_ops.io import check_writable, check_writable_dir

    inputs = [*_input_paths(args), *extra_inputs]
    outputs = _output_paths(args)
    for out in outputs:
        check_writable(out, *inputs)
    if len({str(Path(o).resolve()) for o in outputs}) < len(outputs):
        raise UserInputError(f"two outputs of this command are the same file ({', '.join(outputs)}); choose "
                             "different paths")
    if getattr(args, "target_latency", None) is not None and args.latency_cache:
        check_writable_dir(args.latency_cache, "--latency-cache")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds like Ctrl-C: every ``finally`` and cleanup runs
    (temporary files and folders removed, outputs all or nothing) before the exit with 143."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` for the block (main thread only; the previous handler is restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

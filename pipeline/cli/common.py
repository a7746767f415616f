"""What the commands share: the number types of argparse (one parser with bounds), data, labels, task, shapes,
cluster and latency targets built from the parsed options, and the printing of a result on stdout.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

from graph_ops.errors import UserInputError


def _emit(args: argparse.Namespace, text: object = "") -> None:
    """Print a command's result on the stdout of the caller (library output is routed to stderr meanwhile)."""
    print(text, file=args.stdout)


def _number(kind: type = float, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, name: str | None = None, unit: str = "",
            nonzero: bool = False) -> Callable[[str], float]:
    """The argparse ``type=`` for a number: ``kind`` (``int`` or ``float``, finite), at least ``low`` (more than it
    with ``low_open``), at most ``high`` (less than it with ``high_open``; a value that would run for hours is a
    typo, not a setting), not zero with ``nonzero``. Every refusal is argparse's usage error naming the value and
    what is allowed: ``x is not an integer >= 1``, ``x is not a number > 0``, ``x is more than 100 points``, or with
    ``name`` and both bounds ``x is not a fraction in (0, 1]``."""
    noun = "an integer" if kind is int else "a number"

    def parsed(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if nonzero and value == 0:
            raise argparse.ArgumentTypeError(f"{text} is zero; give a finite non-zero number")
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if name is not None and (below or above):
            raise argparse.ArgumentTypeError(f"{text} is not a {name} in {'(' if low_open else '['}{low:g}, "
                                             f"{high:g}{')' if high_open else ']'}")
        if below:
            raise argparse.ArgumentTypeError(f"{text} is not {noun} {'>' if low_open else '>='} {low:g}")
        if above:
            raise argparse.ArgumentTypeError(f"{text} is more than {high:g}{unit}")
        return value

    return parsed


_finite = _number()


_positive_int = _number(int, low=1)


_non_negative_int = _number(int, low=0)


_non_negative = _number(low=0)


_positive = _number(low=0, low_open=True)


_nonzero = _number(nonzero=True)


_share = _number(low=0, high=1, high_open=True, name="share")


_fraction = _number(low=0, high=1, low_open=True, name="fraction")


def _task_classes(text: str) -> str:
    """``--task-classes``: two or more distinct non-negative class ids, checked while parsing (usage error)."""
    from pipeline.data.task import parse_classes

    try:
        parse_classes(text)
    except UserInputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of batch sizes, e.g. 1,8,32") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return values


def _round_to(args: argparse.Namespace) -> int:
    """``--round-to`` if given, else the default of the deployment target (``--backend``, ``--precision``)."""
    if args.round_to is not None:
        return args.round_to
    from pipeline.deployment.engines import default_round_to

    return default_round_to(args.backend, args.precision)


def _dataset(spec: str | None, args: argparse.Namespace, *, split: str | None, dense: bool = False,
             labels_path: str | None = None) -> object | None:
    """Open a dataset from the CLI options (``mnist`` = the shipped digits; an .npz; an image folder); ``dense``:
    with the dense labels of ``--label-format`` / ``labels_path`` (default ``--labels-path``: calibration data)."""
    if spec is None:
        return None
    from pipeline.data.named import open_dataset

    labels = {"label_format": getattr(args, "label_format", None),
              "labels_path": labels_path or getattr(args, "labels_path", None)} if dense else {}
    return open_dataset(spec, split=split, limit=args.limit, scale=args.scale, mean=args.mean, std=args.std,
                        size=args.size, crop=args.crop, input_keys=args.input_key, label_key=args.label_key,
                        channel_order=args.channel_order, **labels)


def _eval_dataset(args: argparse.Namespace) -> object | None:
    """``--eval-data`` at its held-out split (:func:`_eval_split`), with the dense labels of ``--eval-labels-path``
    where the command has that option and it is given (``--label-format`` names their format when it is not
    clear from the path); None without ``--eval-data``."""
    if not args.eval_data:
        return None
    labels_path = getattr(args, "eval_labels_path", None)
    return _dataset(args.eval_data, args, split=_eval_split(args.eval_data, args), dense=labels_path is not None,
                    labels_path=labels_path)


def _label_options(args: argparse.Namespace) -> object:
    """Where the labels come from: ``--labels``, ``--output-kind``, the decoder thresholds, the location sampling."""
    from pipeline.data.locations import Sampling
    from pipeline.data.outputs import DecodeOptions
    from pipeline.data.targets import LabelOptions

    return LabelOptions(source=args.labels, output_kind=args.output_kind,
                        decode=DecodeOptions(blank=args.blank, map_threshold=args.map_threshold,
                                             conf=args.conf_threshold, iou=args.iou_threshold),
                        sampling=Sampling(per_class=args.locations_per_class,
                                          background_ratio=args.background_ratio))


def _eval_split(spec: str, args: argparse.Namespace) -> str:
    """Held-out part for evaluation: ``--eval-split`` (``eval``: also spelled ``--split``), else 'test' where the data
    has one, else all of it."""
    from pipeline.data.named import default_eval_split

    return args.eval_split or default_eval_split(spec)


def _warn(args: argparse.Namespace, text: str) -> None:
    """One ``diprune: warning: ...`` line on stderr (not with -q)."""
    if not args.quiet:
        print(f"diprune: warning: {text}", file=sys.stderr)


def _shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """The ``--input-shape`` options as ``{input name: dims}`` (``""``: the model's single input)."""
    from pipeline.model.prepare import parse_input_shapes

    return parse_input_shapes(args.input_shape)


def _with_shapes(path: str | None, args: argparse.Namespace) -> object:
    """A model file, loaded with its ``--input-shape`` dims fixed when any are given (else the path itself)."""
    shapes = _shapes(args)
    if path is None or not shapes:
        return path
    from graph_ops.io import load_model
    from graph_ops.proto import with_input_shapes

    return with_input_shapes(load_model(path), shapes)


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _cluster(args: argparse.Namespace) -> object | None:
    """Ray options of ``--workers`` / ``--ray`` (None when neither is given)."""
    if args.workers is None and args.ray is None:
        return None
    from pipeline.cluster import ray_options

    return ray_options(workers=args.workers, address=args.ray)


def _task(args: argparse.Namespace) -> object | None:
    """The task of ``--task-classes`` / ``--task-map`` (None when neither is given)."""
    from pipeline.data.task import task_from_options

    return task_from_options(getattr(args, "task_classes", None), getattr(args, "task_map", None))


def _latency_target(args: argparse.Namespace) -> object:
    """Where latency is measured: ``--backend``, ``--precision``, ``--latency-batch``, ``--latency-threads``."""
    from pipeline.deployment.latency_model import LatencyTarget

    return LatencyTarget(backend=args.backend, precision=args.precision, batch=args.latency_batch,
                         threads=args.latency_threads)


def _latency_budget(args: argparse.Namespace) -> object | None:
    """The ``--target-latency`` budget with its measurement settings (None without it)."""
    if args.target_latency is None:
        if getattr(args, "latency_model", None):
            raise UserInputError("--latency-model is what --target-latency plans against: add --target-latency F")
        return None
    from pipeline.deployment.latency_plan import LatencyBudget

    return LatencyBudget(args.target_latency, _latency_target(args), iterations=args.latency_iterations,
                         cache_dir=Path(args.latency_cache) if args.latency_cache else None,
                         model_file=Path(args.latency_model) if args.latency_model else None,
                         progress=not args.quiet)


def _top1(metrics: dict) -> str:
    """A top-1 for a summary line (``n/a`` without labels)."""
    return "n/a" if metrics.get("top1") is None else f"{metrics['top1']:.4f}"

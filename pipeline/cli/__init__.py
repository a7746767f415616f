"""The ``diprune`` command line: one subcommand per public function, no logic of its own.

Exit codes: 0 success, 1 error (bad input, unsupported model, ...), 2 usage (also every number that makes no sense),
3 verification failed (``export``: the parity check; ``run``: no candidate passes every gate), 130 interrupted
(SIGINT), 143 terminated (SIGTERM; cleaned up like SIGINT: temporary files removed, inputs intact).
User errors print one line ``diprune: error: ...`` on stderr, never a traceback. Only a command's result goes to
stdout (``--json`` output is pure JSON): whatever libraries print while it runs (onnx-graphsurgeon's ``[W]``
warnings) is routed to stderr, like the logs.

Every output path is checked before any work by one guard (:func:`_check_outputs`, built on
:func:`graph_ops.io.check_writable`): never one of the command's inputs (model, data, reference, plan, scores,
statistics, task map, torch spec file, latency cache), never a device node or FIFO, a name the file system takes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from graph_ops.errors import PruneError, UserInputError
from pipeline.choices import (
    ALLOCATIONS,
    BACKENDS,
    DEFAULT_ALLOCATION,
    DEFAULT_POOLING,
    DEFAULT_RECOVERY,
    DEFAULT_STEPS,
    FINETUNE_DEFAULTS,
    POOLINGS,
    PRECISIONS,
    PUSH_DEFAULTS,
    RECOVERY,
    SCORERS,
)
from pipeline.memory import no_huge_page_advice

logger = logging.getLogger("diprune")



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


def _dataset(spec: str | None, args: argparse.Namespace, *, split: str | None, dense: bool = False) -> object | None:
    """Open a dataset from the CLI options (``mnist`` = the shipped digits; an .npz; an image folder); ``dense``:
    with the dense labels of ``--label-format`` / ``--labels-path`` (calibration data)."""
    if spec is None:
        return None
    from pipeline.data.named import open_dataset

    labels = {"label_format": getattr(args, "label_format", None),
              "labels_path": getattr(args, "labels_path", None)} if dense else {}
    return open_dataset(spec, split=split, limit=args.limit, scale=args.scale, mean=args.mean, std=args.std,
                        size=args.size, crop=args.crop, input_keys=args.input_key, label_key=args.label_key,
                        channel_order=args.channel_order, **labels)


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


def _with_shapes(path: str | None, args: argparse.Namespace) -> object:
    """A model file, loaded with its ``--input-shape`` dims fixed when any are given (else the path itself)."""
    shapes = _shapes(args)
    if path is None or not shapes:
        return path
    from graph_ops.io import load_model
    from graph_ops.proto import with_input_shapes

    return with_input_shapes(load_model(path), shapes)


def _add_data_options(parser: argparse.ArgumentParser, *, evaluation: bool = False) -> None:
    """The data options; ``evaluation``: the command only evaluates (``eval``), so its one split option is spelled
    ``--split`` or ``--eval-split``."""
    if evaluation:
        parser.add_argument("--split", "--eval-split", dest="eval_split", choices=("train", "test", "all"),
                            default=None, help="the part of the data evaluated (default: 'test' where the data has "
                                               "one, else all of it)")
    else:
        parser.add_argument("--split", choices=("train", "test", "all"), default=None,
                            help="calibration part of the data (default: 'train' where the data has one, else all)")
        parser.add_argument("--eval-split", choices=("train", "test", "all"), default=None,
                            help="evaluation part of the data (default: 'test' where the data has one, else all)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="use at most N samples (the first N)")
    parser.add_argument("--scale", type=_nonzero, default=None, help="uint8 inputs: x * scale (default 1/255)")
    parser.add_argument("--mean", type=_finite, nargs="+", default=None,
                        help="per-channel mean after scaling (default 0; image folders: ImageNet's)")
    parser.add_argument("--std", type=_positive, nargs="+", default=None,
                        help="per-channel std after scaling (default 1; image folders: ImageNet's)")
    parser.add_argument("--size", type=_positive_int, default=None,
                        help="image folders: resize the shorter side to SIZE (default 256)")
    parser.add_argument("--crop", type=_positive_int, default=None,
                        help="image folders: centre crop CROP x CROP (default 224)")
    parser.add_argument("--channel-order", choices=("rgb", "bgr", "gray"), default="rgb",
                        help="image folders: channel order, or gray for one-channel models (default mean/std then "
                             "0.449/0.226, the mean of ImageNet's)")
    parser.add_argument("--input-key", action="append", default=None, metavar="ARRAY[=INPUT]",
                        help=".npz: the input array (default: every array but the labels); ARRAY=INPUT per input "
                             "of a multi-input model (repeatable)")
    parser.add_argument("--label-key", default=None, metavar="ARRAY", help=".npz: the labels array (default: y)")


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.model.export_spec import export_spec

    name, shape = _export_shape(args)
    result = export_spec(args.spec, Path(args.output), input_shape=shape, input_name=name, opset=args.opset,
                         dynamic_batch=args.dynamic_batch, exporter=args.exporter, rtol=args.rtol, atol=args.atol)
    _emit(args, result.parity.summary())
    _emit(args, result.summary())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pipeline.job.config import load_config
    from pipeline.job.run import run_config

    config = load_config(args.config)
    if args.output:
        config = replace(config, output=Path(args.output))
    echo = None if args.quiet else (lambda line: print(f"diprune run: {line}", file=sys.stderr))
    report = run_config(config, mlflow=args.mlflow is not None, mlflow_uri=args.mlflow or None,
                        progress=not args.quiet, echo=echo, use_cache=not args.no_cache)
    _emit(args, "\n".join(report.summary_lines(_shown(config.output))))
    return report.exit_code


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.model.prepare import prepare
    from pipeline.prune.advice import sample_advice
    from pipeline.prune.summary import group_status_text, inspect_summary

    prepared = prepare(args.model, _shapes(args))
    info = inspect_summary(prepared)
    advice = sample_advice(prepared)
    info["calibration_advice"] = advice.to_dict()
    if args.json:
        _emit(args, json.dumps(info, indent=1))
        return 0
    _emit(args, f"model {args.model} sha256 {info['model_sha256']}")
    macs = info["macs"] if info["macs"] is not None else (
        f"unknown ({len(info['macs_unknown_nodes'])} nodes with a dynamic size: give --input-shape)")
    _emit(args, f"macs {macs} params {info['params']} groups {len(info['groups'])} "
          f"prunable {info['prunable_groups']} protected {info['protected_groups']} frozen {info['frozen_groups']} "
          f"prunable_conv_share {info['prunable_conv_share']:.3f}")
    for g in info["groups"]:
        blocks = f"\tblocks {g['blocks']}" if g["blocks"] > 1 else ""
        _emit(args, f"group {g['id']}\tsize {g['size']}{blocks}\tstatus {group_status_text(g)}\t"
              f"producers {','.join(g['producers'])}\tconsumers {','.join(g['consumers'])}")
    _emit(args, advice.summary())
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from pipeline.prune.apply import apply_plan_file

    result = apply_plan_file(args.model, args.plan, args.output, mask_only=args.mask_only,
                             input_shapes=_shapes(args))
    _emit(args, result)
    return 0


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


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pipeline.calibration.calibrate import calibrate
    from pipeline.data.targets import describe_record
    from pipeline.model.prepare import prepare

    out = Path(args.output)
    task = _task(args)
    cluster = _cluster(args)
    data = _dataset(args.data, args, split=args.split, dense=True)
    note = ""
    if task is not None:
        restricted = task.dataset(data)
        data, note = restricted.data, f" (task {task.describe()}: {restricted.dropped} samples of other classes dropped)"
    labelled = args.labels == "model" or any(getattr(data, key, None) is not None for key in ("labels", "targets"))
    stats = calibrate(prepare(args.model, _shapes(args), task=task), data, pooling=args.pooling,
                      batch_size=args.batch_size, progress=not args.quiet, require_labels=labelled, cluster=cluster,
                      shard_batches=args.shard_batches, labels=_label_options(args), seed=args.seed)
    stats.save(out)
    paired = f", {describe_record(stats.targets)}" if stats.targets else ", no labels"
    what = "locations" if stats.targets and stats.targets.get("kind") != "classes" else "samples"
    _emit(args, f"wrote {out}: {len(stats.probes)} probes, {next(iter(stats.probes.values())).n} {what}{paired}{note}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from graph_ops.io import atomic_write_bytes
    from pipeline.calibration.stats import CalibrationStats
    from pipeline.data.task import Task
    from pipeline.model.prepare import prepare
    from pipeline.prune.orchestrate import score

    out = Path(args.output)
    stats = CalibrationStats.load(args.stats) if args.stats else None
    task = Task.from_dict(stats.task, f"statistics {args.stats}") if stats is not None else None
    prepared = prepare(args.model, _shapes(args), task=task)
    if stats is not None and stats.model_sha256 != prepared.sha256:
        raise UserInputError(f"statistics {args.stats} were computed for model {stats.model_sha256[:12]}, "
                             f"not for {args.model} ({prepared.sha256[:12]}); calibrate this model first")
    scores = score(prepared, stats, args.method, seed=args.seed)
    atomic_write_bytes(out, scores.to_json(model_path=str(Path(args.model).resolve())).encode())
    _emit(args, f"wrote {out}: {args.method} scores for {len(scores.scores)} groups")
    return 0


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


def _latency_note(plan_meta: dict) -> str:
    """``, measured latency x... of the original (requested x...)`` for a latency plan, else empty."""
    record = plan_meta.get("latency")
    if not record:
        return ""
    if record.get("measured_ratio") is None:
        return (f", predicted latency x{record['predicted_ratio']:.3f} of the original on {record['latency_model']} "
                f"(requested x{record['target_latency']:.3f}; not timed here)")
    return (f", measured latency x{record['measured_ratio']:.3f} of the original (requested "
            f"x{record['target_latency']:.3f}; {len(record['tries'])} plan(s) timed)")


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.data.task import Task
    from pipeline.model.prepare import prepare
    from pipeline.prune.orchestrate import require_channels
    from pipeline.selection.allocate import select_channels
    from pipeline.selection.scorers.base import ChannelScores

    out = Path(args.output)
    scores, model_path = ChannelScores.load(args.scores)
    if args.model is None and model_path:  # the model recorded in the scores is an input too
        _check_outputs(args, extra_inputs=(model_path,))
    prepared = prepare(args.model or model_path, _shapes(args),
                       task=Task.from_dict(scores.task, f"scores {args.scores}"))
    require_channels(prepared)
    if scores.model_sha256 and scores.model_sha256 != prepared.sha256:
        raise UserInputError(f"scores {args.scores} belong to model {scores.model_sha256[:12]}, "
                             f"not {prepared.path} ({prepared.sha256[:12]})")
    unknown = sorted(set(scores.scores) - set(prepared.index.by_id))
    if unknown:
        raise UserInputError(f"scores {args.scores} name group(s) {', '.join(unknown[:3])} that {prepared.path} does "
                             "not have ('diprune inspect' lists its groups); score this model again")
    options = {"target_macs": args.target_macs, "target_params": args.target_params, "round_to": _round_to(args),
               "min_channels": args.min_channels, "protect": tuple(args.protect),
               "keep_first_and_last": not args.prune_ends}
    latency = _latency_budget(args)
    if latency is not None:
        from pipeline.deployment.latency_plan import plan_for_latency

        plan = plan_for_latency(prepared, scores, latency, **options)
    else:
        plan = select_channels(scores, prepared.index, **options)
    plan = plan.with_sha(prepared.sha256).with_input_shapes(prepared.input_shapes)
    if scores.task or scores.labels:
        from dataclasses import replace

        extra = {"task": dict(scores.task)} if scores.task else {}
        extra |= {"labels": dict(scores.labels)} if scores.labels else {}
        plan = replace(plan, meta={**plan.meta, **extra})
    plan.save(out)
    for note in plan.meta.get("notes", ()):
        _warn(args, note)
    _emit(args, f"wrote {out}: {plan.summary()}{_latency_note(dict(plan.meta))}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from pipeline.prune.one_shot import prune

    if args.target_macs is None and args.target_params is None and args.max_drop is None \
            and args.target_latency is None:
        raise UserInputError("give a budget: --target-macs F, --target-params F or --target-latency F (fraction "
                             "kept, e.g. 0.5), or --max-drop P (accuracy points) with --eval-data")
    if args.max_drop is not None and (args.target_macs is not None or args.target_params is not None
                                      or args.target_latency is not None):
        raise UserInputError("--max-drop searches the budget itself; drop --target-macs / --target-params / "
                             "--target-latency")
    eval_data = _dataset(args.eval_data, args, split=_eval_split(args.eval_data, args)) if args.eval_data else None
    report = prune(args.model, args.output, data=_dataset(args.data, args, split=args.split, dense=True),
                   method=args.method,
                   target_macs=args.target_macs, target_params=args.target_params, round_to=_round_to(args),
                   min_channels=args.min_channels, protect=tuple(args.protect), pooling=args.pooling,
                   batch_size=args.batch_size, eval_data=eval_data, seed=args.seed, progress=not args.quiet,
                   recover=args.recover, recover_mode=args.recover_mode, task=_task(args), max_drop=args.max_drop,
                   robustness=args.robustness, keep_first_and_last=not args.prune_ends, input_shapes=_shapes(args),
                   cluster=_cluster(args), shard_batches=args.shard_batches,
                   latency=_latency_budget(args), quantize=args.quantize, max_top1_drop=args.max_top1_drop,
                   int8_ranking=args.int8_ranking, timing=_latency_target(args), finetune_epochs=args.finetune_epochs,
                   allocation=args.allocation, steps=args.steps,
                   int8_calibration=args.int8_calibration, fp16=args.precision == "fp16",
                   fp16_keep_io_types=args.fp16_keep_io_types, fp16_block=tuple(args.fp16_block),
                   labels=_label_options(args))
    for note in report.notes:
        _warn(args, note)
    for step in report.search:
        logger.info("searched MACs %.4f: top-1 %.4f (%s)", step["macs_fraction"], step["top1"],
                    "within" if step["within"] else "outside")
    plan_meta = json.loads(Path(f"{args.output}.plan.json").read_text()).get("meta", {})
    _emit(args, f"wrote {args.output} and {args.output}.report.json: {report.summary()}{_latency_note(plan_meta)}")
    if "int8" in report.evaluation:
        from pipeline.deployment.int8_stage import int8_path, int8_summary

        _emit(args, f"wrote {int8_path(args.output)}: {int8_summary(report.evaluation['int8'])}")
    if "fp16" in report.evaluation:
        from pipeline.deployment.fp16 import fp16_path, fp16_summary

        _emit(args, f"wrote {fp16_path(args.output)}: {fp16_summary(report.evaluation['fp16'])}")
    if args.backend in ("tensorrt", "ort-trt"):
        from pipeline.deployment.deploy import artifacts_summary

        for line in artifacts_summary(report.artifacts):
            _emit(args, f"on the board: {line}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from pipeline.training.finetune import FinetuneOptions, finetune_file

    options = FinetuneOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              temperature=args.temperature, ce_weight=args.ce_weight,
                              feature_weight=args.feature_weight, seed=args.seed, threads=args.threads,
                              validation=args.validation)
    eval_data = _dataset(args.eval_data, args, split=_eval_split(args.eval_data, args)) if args.eval_data else None
    doc = finetune_file(args.model, args.reference, args.output, _dataset(args.data, args, split=args.split),
                        options, plan_path=args.plan, eval_data=eval_data, progress=not args.quiet)
    for note in doc["notes"]:
        _warn(args, note)
    record = doc["finetune"]
    if not record["kept"]:
        _warn(args, f"no epoch beat the input on the validation slice; {args.output} has the input's weights "
                    "(try --epochs or --lr)")
    line = f"{record['verdict']} ({record['epochs_run']} epoch(s), {record['steps']} steps, {record['seconds']:.1f} s)"
    if "evaluation" in doc:
        ev = doc["evaluation"]
        line += f", top-1 {_top1(ev['before'])} -> {_top1(ev['after'])} (reference {_top1(ev['reference'])})"
    _emit(args, f"wrote {args.output} and {args.output}.report.json: {line}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    import tempfile

    from pipeline.prune.one_shot import push_and_prune
    from pipeline.training.push import PushOptions

    if args.target_macs is None and args.target_params is None:
        raise UserInputError("give a budget: --target-macs F or --target-params F (fraction kept, e.g. 0.25)")
    options = PushOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, sep_weight=args.sep_weight,
                          cov_weight=args.cov_weight, align_weight=args.align_weight, seed=args.seed,
                          threads=args.threads)
    data = _dataset(args.data, args, split=args.split)
    eval_data = _dataset(args.eval_data, args, split=_eval_split(args.eval_data, args)) if args.eval_data else None
    prune_options = {"method": args.method, "target_macs": args.target_macs, "target_params": args.target_params,
                     "round_to": _round_to(args), "min_channels": args.min_channels, "protect": tuple(args.protect),
                     "recover": args.recover, "keep_first_and_last": not args.prune_ends, "seed": args.seed,
                     "finetune_epochs": args.finetune_epochs}
    with tempfile.TemporaryDirectory(prefix="diprune-push-") as tmp:
        model = _push_source(args, Path(tmp))
        report, record = push_and_prune(model, args.output, data=data, options=options, pushed_path=args.pushed,
                                        eval_data=eval_data, progress=not args.quiet, source=args.model,
                                        **prune_options)
    for note in report.notes:
        _warn(args, note)
    _emit(args, record.summary())
    _emit(args, f"wrote {report.model} (pushed), {args.output} and {args.output}.report.json: {report.summary()}")
    return 0


def _top1(metrics: dict) -> str:
    """A top-1 for a summary line (``n/a`` without labels)."""
    return "n/a" if metrics.get("top1") is None else f"{metrics['top1']:.4f}"


def _push_source(args: argparse.Namespace, tmp: Path) -> str:
    """The ONNX file to push: the model path, or a torch spec exported first (``diprune export``'s checks)."""
    if args.model.endswith(".onnx") or Path(args.model).is_file() or ":" not in args.model:
        return args.model
    from pipeline.model.export_spec import export_spec

    name, shape = _export_shape(args)
    result = export_spec(args.model, tmp / "exported.onnx", input_shape=shape, input_name=name)
    _emit(args, result.parity.summary())
    return str(result.path)


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluation.evaluate import evaluate

    task = _task(args)
    split = _eval_split(args.data, args)
    data = _dataset(args.data, args, split=split, dense=True)
    if data.labels is None and data.targets is None:
        if args.reference is None:
            raise UserInputError(f"data {args.data} has no labels and no --reference was given, so there is nothing "
                                 "to measure; name the labels array with --label-key (dense labels: --labels-path), or compare with --reference "
                                 "ORIGINAL.onnx")
        _warn(args, f"data {args.data} has no labels: top-1/top-5 are not measured (null), only the comparison "
                    "with the reference (name the labels array with --label-key)")
    model, reference = _with_shapes(args.model, args), _with_shapes(args.reference, args)
    labels = _label_options(args)
    report = evaluate(model, data, reference=reference, task=task, output_kind=labels.output_kind,
                      decode=labels.decode)
    doc = {**report.to_dict(), "split": split, "data": data.name}
    if reference is not None and report.top1 is not None:  # the reference's own accuracy, on the same samples
        own = evaluate(reference, data, task=task)
        doc["reference"] = {"top1": own.top1, "top5": own.top5}
    if reference is not None and report.metrics and report.metrics["against"] == "labels":  # the same for dense
        own = evaluate(reference, data, task=task, output_kind=labels.output_kind, decode=labels.decode)
        doc["reference"] = {"metrics": own.metrics}
    if task is not None:
        doc["task"] = {**task.to_dict(), "names": list(task.names)}
    if args.robustness:
        from graph_ops.io import load_model
        from pipeline.evaluation.robustness import robustness

        if args.reference is None:
            raise UserInputError("--robustness compares the model with its original: pass --reference ORIGINAL.onnx")
        model, original = load_model(args.model), load_model(args.reference)
        if task is not None:
            model, original, data = task.head(model), task.head(original), task.dataset(data).data
        doc["robustness"] = robustness(original, model, data)
    _emit(args, json.dumps(doc, indent=1))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from graph_ops.io import atomic_write_bytes
    from pipeline.deployment.bench import measure

    out = Path(args.json) if args.json else None
    report = measure(args.models, backend=args.backend, batches=args.batch, warmup_s=args.warmup,
                     min_duration_s=args.duration, min_iters=args.iterations, rounds=args.rounds,
                     threads=args.threads, round_to=_round_to(args), data=args.data, precision=args.precision,
                     workdir=args.workdir, input_shapes=_shapes(args))
    if out is not None:
        atomic_write_bytes(out, report.to_json().encode())
    _emit(args, report.to_markdown())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.prune.demo import run_demo

    for line in run_demo(Path(args.work), progress=not args.quiet):
        _emit(args, line)
    return 0


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


def _add_task_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--task-classes", type=_task_classes, default=None, metavar="C1,C2,...",
                       help="the task uses these classes of the model, in this order: the head keeps their scores, "
                            "data of other classes is dropped, labels become task indices")
    group.add_argument("--task-map", default=None, metavar="FILE.json",
                       help='grouped task, e.g. {"odd": [1,3,5,7,9], "even": [0,2,4,6,8]}: one score per group '
                            "(log-sum-exp of the member logits)")


def _add_label_options(parser: argparse.ArgumentParser, *, evaluation: bool = False) -> None:
    """The label options; ``evaluation`` (``eval``): the dense labels, output kind and decoders, no ``--labels``
    source or location sampling (the metrics are scored against the data's labels, else the reference's)."""
    from pipeline.choices import (
        DEFAULT_BACKGROUND_RATIO,
        DEFAULT_PER_CLASS,
        LABEL_FORMATS,
        LABEL_SOURCES,
        MAP_THRESHOLD,
        OUTPUT_KINDS,
        YOLO_CONF,
        YOLO_IOU,
    )

    if evaluation:
        parser.set_defaults(labels=None, locations_per_class=DEFAULT_PER_CLASS,
                            background_ratio=DEFAULT_BACKGROUND_RATIO)
    else:
        parser.add_argument("--labels", choices=LABEL_SOURCES, default=None,
                            help="labels of di/lda/pls-vip: 'data' (the data's), or 'model' (the original model's "
                                 "own decisions on the data); default: the data's when it has some, else the model's")
    parser.add_argument("--label-format", choices=LABEL_FORMATS, default=None,
                        help="dense labels: yolo (a .txt per image), coco (instances JSON), mask (a PNG per image), "
                             "text (an .npz y of shape (N, L), padded with -1); default: from --labels-path / y")
    parser.add_argument("--labels-path", default=None, metavar="PATH",
                        help="the label folder or file of --data (image a.jpg <-> a.txt / a.png / COCO file_name a; "
                             ".npz sample i <-> i.txt)")
    parser.add_argument("--output-kind", choices=tuple(OUTPUT_KINDS), default=None,
                        help="what the model's first output is (default: detected from its shape): classes [N,K], "
                             "sequence [N,T,K] (CTC), map [N,K,H,W], yolo [N,4+K,A]")
    parser.add_argument("--blank", type=_non_negative_int, default=0, help="CTC blank class (default 0)")
    parser.add_argument("--map-threshold", type=_fraction, default=MAP_THRESHOLD,
                        help=f"model labels of a [N,1,H,W] probability map: class 1 above it (default {MAP_THRESHOLD})")
    parser.add_argument("--conf-threshold", type=_fraction, default=YOLO_CONF,
                        help=f"model labels of a YOLO head (eval: the reference's boxes taken as ground truth): "
                             f"detections above it (default {YOLO_CONF})")
    parser.add_argument("--iou-threshold", type=_fraction, default=YOLO_IOU,
                        help=f"model labels of a YOLO head: class-wise NMS IoU (default {YOLO_IOU})")
    if evaluation:
        return
    parser.add_argument("--locations-per-class", type=_positive_int, default=DEFAULT_PER_CLASS, metavar="N",
                        help=f"dense labels: locations sampled per class and image (default {DEFAULT_PER_CLASS})")
    parser.add_argument("--background-ratio", type=_non_negative, default=DEFAULT_BACKGROUND_RATIO, metavar="R",
                        help="dense labels: background locations per sampled object location (default "
                             f"{DEFAULT_BACKGROUND_RATIO:g})")


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    from pipeline.data.shards import SHARD_BATCHES

    parser.add_argument("--shard-batches", type=_positive_int, default=SHARD_BATCHES, metavar="N",
                        help="batches per shard of the data; statistics are summed per shard and merged in shard "
                             "order, so they depend on N (in the last bits), never on --workers")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                       help="compute the data's shards on a local Ray with N worker processes (extra [ray]); "
                            "the results equal those of a run without it")
    group.add_argument("--ray", default=None, metavar="ADDRESS",
                       help="compute the shards on an existing Ray cluster ('auto', HOST:6379, ray://HOST:10001); "
                            "the data must be readable at the same path on its nodes")


def _add_budget_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target-macs", type=_fraction, default=None, help="fraction of the original MACs to keep")
    parser.add_argument("--target-params", type=_fraction, default=None, help="fraction of the params to keep")
    parser.add_argument("--round-to", type=_positive_int, default=None,
                        help="kept widths are multiples of N (default: from --backend/--precision, 8 for ort-cpu)")
    parser.add_argument("--backend", choices=BACKENDS, default="ort-cpu",
                        help="deployment target; picks the --round-to default")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="deployment precision; picks the --round-to default (int8 on TensorRT: 32); prune "
                             "--precision fp16 also writes OUT.fp16.onnx")
    parser.add_argument("--min-channels", type=_positive_int, default=8, help="never keep fewer channels in a group")
    parser.add_argument("--protect", action="append", default=[], metavar="GROUP_ID",
                        help="never prune this group (repeatable; ids from 'diprune inspect')")
    parser.add_argument("--prune-ends", action="store_true",
                        help="also prune the first layer and the classifier input (protected by default)")
    _add_latency_options(parser)


def _add_latency_options(parser: argparse.ArgumentParser) -> None:
    from pipeline.choices import default_cache_dir

    parser.add_argument("--target-latency", type=_fraction, default=None, metavar="F",
                        help="fraction of the original's latency measured on --backend (closed loop: planned with a "
                             "latency model of the target, then measured and corrected)")
    parser.add_argument("--latency-batch", type=_positive_int, default=1, help="batch size latency is measured at")
    parser.add_argument("--latency-threads", type=_positive_int, default=None,
                        help="onnxruntime intra-op threads for latency (default: onnxruntime's choice)")
    parser.add_argument("--latency-iterations", type=_positive_int, default=4,
                        help="at most this many plans are measured in the closed loop")
    parser.add_argument("--latency-model", default=None, metavar="FILE",
                        help="with --target-latency: plan against this latency model (from 'diprune latency fit' on "
                             "the board's profiles) instead of timing here; no closed loop")
    parser.add_argument("--latency-cache", default=str(default_cache_dir()), metavar="DIR",
                        help="where latency models are kept, keyed by target, versions and layer shapes ('' for "
                             "none); checked before any work, locked while a model is built")


def _add_training_options(p: argparse.ArgumentParser, defaults: dict[str, float]) -> None:
    p.add_argument("--data", required=True, help="training data: 'mnist', an .npz or an image folder")
    p.add_argument("--eval-data", default=None, help="held-out data for the report (test split by default)")
    p.add_argument("--epochs", type=_positive_int, default=defaults["epochs"], help="passes over the training data")
    p.add_argument("--lr", type=_positive, default=defaults["lr"], help="Adam's peak learning rate")
    p.add_argument("--batch-size", type=_positive_int, default=defaults["batch_size"], help="samples per training step")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the data order and initialisation")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch and onnxruntime threads")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write (its report: OUTPUT.report.json)")
    _add_data_options(p)


def _add_finetune_options(p: argparse.ArgumentParser) -> None:
    defaults = FINETUNE_DEFAULTS
    p.add_argument("model", help="the pruned model (its plan <model>.plan.json is read when present)")
    p.add_argument("--reference", required=True, help="the original model: the teacher")
    p.add_argument("--temperature", type=_positive, default=defaults["temperature"],
                   help="distillation temperature (softens both models' class scores)")
    p.add_argument("--ce-weight", type=_non_negative, default=defaults["ce_weight"],
                   help="weight of cross-entropy on the labels, when the data has labels")
    p.add_argument("--feature-weight", type=_non_negative, default=defaults["feature_weight"],
                   help="weight of feature matching at the group probes (needs the plan; 0: off)")
    p.add_argument("--plan", default=None, help="the plan the model was pruned with (default: <model>.plan.json)")
    p.add_argument("--validation", type=_share, default=defaults["validation"],
                   help="share of --data held out to choose the epoch kept (0: keep the last epoch)")
    _add_training_options(p, defaults)


def _add_input_shape(parser: argparse.ArgumentParser, *, export: bool = False) -> None:
    """``--input-shape [NAME:]DIMS``, one syntax on every subcommand (repeatable; DIMS alone: the single input)."""
    text = ("torch specs: the example input, e.g. input:1x3x224x224 or 1x3x224x224 (default: the architecture's; "
            "required for file.py)") if export else (
            "static dims of a model input, e.g. images:1x3x640x640, or 1x3x640x640 for a single-input model "
            "(repeatable); fixes dynamic sizes for shape inference, MACs, calibration and bench")
    parser.add_argument("--input-shape", action="append", default=[], metavar="[NAME:]DIMS", help=text)


def _add_push_options(p: argparse.ArgumentParser) -> None:
    defaults = PUSH_DEFAULTS
    p.add_argument("model", help="an .onnx file, or a torch spec as in 'diprune export' (exported first)")
    _add_input_shape(p, export=True)
    p.add_argument("--method", choices=sorted(SCORERS), default="di", help="how channels are scored")
    p.add_argument("--recover", choices=list(RECOVERY), default=DEFAULT_RECOVERY,
                   help="training-free recovery after removal")
    p.add_argument("--finetune-epochs", type=_non_negative_int, default=0, metavar="N",
                   help="after recovery, distil the pushed model into the pruned one for N epochs")
    p.add_argument("--pushed", default=None, help="where the pushed, unpruned model goes (default: <output "
                                                  "stem>.pushed.onnx; the plan refers to it)")
    terms = {"sep": "class separation in the kept channels", "cov": "decorrelation of the kept channels",
             "align": "agreement with the original model's outputs"}
    for term, what in terms.items():
        p.add_argument(f"--{term}-weight", type=_non_negative, default=defaults[f"{term}_weight"],
                       help=f"weight of the push objective's {what} term")
    _add_budget_options(p)
    _add_training_options(p, defaults)


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


def _add_verbosity(parser: argparse.ArgumentParser, *, default: bool) -> None:
    """``-v``/``-q``; on the subcommands without defaults, so that options given before the subcommand stay."""
    verbose = {"default": 0} if default else {"default": argparse.SUPPRESS}
    quiet = {"default": False} if default else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="count", help="-v: stage timings, -vv: debug", **verbose)
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bars", **quiet)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, without the noise: no ``(default: None)`` / ``False`` / ``[]``, and nothing
    added where the help already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _version() -> str:
    try:
        return importlib.metadata.version("diprune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _add_model_commands(parsers: dict[str, argparse.ArgumentParser]) -> None:
    """inspect, apply, calibrate, score and plan."""
    p = parsers["inspect"]
    p.add_argument("model", help="the .onnx file")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = parsers["apply"]
    p.add_argument("model", help="the .onnx file the plan was made for")
    p.add_argument("plan", help="a plan file from 'diprune plan' or 'diprune prune'")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--mask-only", action="store_true",
                   help="zero the removed channels' exit weights instead of removing them (oracle)")

    p = parsers["calibrate"]
    p.add_argument("model", help="the .onnx file")
    p.add_argument("--data", required=True, help="'mnist', an .npz (inputs + labels) or an image folder")
    p.add_argument("-o", "--output", required=True, help="the statistics file to write (.npz)")
    p.add_argument("--pooling", choices=tuple(POOLINGS), default=DEFAULT_POOLING,
                   help="probe features: auto (what each probe's consumers read), gap, avg2, avg4")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="samples per onnxruntime call")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the location sampling of dense labels")
    _add_data_options(p)
    _add_label_options(p)
    _add_task_options(p)
    _add_ray_options(p)

    p = parsers["score"]
    p.add_argument("stats", nargs="?", default=None, help="statistics from 'diprune calibrate' (not for l1/l2/random)")
    p.add_argument("--model", required=True, help="the .onnx file the statistics were computed on")
    p.add_argument("--method", choices=sorted(SCORERS), default="di", help="how channels are scored")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the random method")
    p.add_argument("-o", "--output", required=True, help="the scores file to write (.json)")

    p = parsers["plan"]
    p.add_argument("scores", help="a scores file from 'diprune score'")
    p.add_argument("--model", default=None, help="the model (default: the path recorded in the scores file)")
    p.add_argument("-o", "--output", required=True, help="the plan file to write (.json)")
    _add_budget_options(p)


def _add_prune_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the .onnx file to prune (never modified)")
    p.add_argument("--data", default=None, help="calibration data: 'mnist', an .npz or an image folder")
    p.add_argument("--eval-data", default=None, help="held-out data for the report (test split by default)")
    p.add_argument("--method", choices=sorted(SCORERS), default="di", help="how channels are scored")
    p.add_argument("--pooling", choices=tuple(POOLINGS), default=DEFAULT_POOLING,
                   help="probe features: auto (what each probe's consumers read), gap, avg2, avg4")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="samples per onnxruntime call")
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seed of the random method and of recovery's position sampling")
    p.add_argument("--recover", choices=list(RECOVERY), default=DEFAULT_RECOVERY,
                   help="training-free recovery after removal: none, bias (R1), regress (R2), lstsq (R3: least-squares "
                        "refit of every affected layer)")
    p.add_argument("--recover-mode", choices=("sequential", "one-pass"), default="sequential",
                   help="sequential: layer by layer on the partly recovered model; one-pass: faster")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=DEFAULT_ALLOCATION,
                   help="measured (default): groups ranked by the output damage their channels cause on a small "
                        "calibration subset, ends included; rule: by the criterion, first layer and classifier "
                        "input protected (--prune-ends lifts that)")
    p.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                   help=f"reach the budget in K rounds of prune + recover on the recovered model "
                        f"(default {DEFAULT_STEPS})")
    p.add_argument("-o", "--output", required=True,
                   help="the pruned .onnx to write (with OUTPUT.plan.json and OUTPUT.report.json)")
    p.add_argument("--robustness", action="store_true",
                   help="report top-1 and agreement under noise and FGSM/PGD attacks (needs --eval-data)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="also write OUT.int8.onnx: the pruned, recovered model in INT8 (onnxruntime static QDQ, "
                        "per-channel weights, calibrated on --data) with --backend's recipe (ort-cpu: uint8 "
                        "asymmetric activations; tensorrt/ort-trt/ort-cuda: symmetric signed int8, zero points 0, "
                        "Q/DQ placed for TensorRT); the report compares fp32 and int8")
    p.add_argument("--max-top1-drop", type=_non_negative, default=None, metavar="P",
                   help="with --quantize int8: keep the layers whose INT8 error loses most information in fp32 "
                        "until held-out top-1 is within P points of the pruned fp32 model")
    p.add_argument("--int8-ranking", choices=("di", "magnitude"), default="di",
                   help="how --max-top1-drop ranks layers: di (DI lost by the class scores) or magnitude "
                        "(weight quantization error)")
    p.add_argument("--int8-calibration", choices=("minmax", "percentile", "entropy"), default=None,
                   help="how --quantize int8 calibrates activation ranges (default: the recipe's, see README)")
    p.add_argument("--fp16-keep-io-types", action=argparse.BooleanOptionalAction, default=True,
                   help="with --precision fp16: keep the fp16 file's inputs and outputs fp32 (default)")
    p.add_argument("--fp16-block", action="append", default=[], metavar="OP",
                   help="with --precision fp16: also keep this op type fp32 (repeatable)")
    p.add_argument("--finetune-epochs", type=_non_negative_int, default=0, metavar="N",
                   help="after recovery, distil the original into the pruned model for N epochs on --data "
                        "(needs the [torch] extra; see 'diprune finetune')")
    p.add_argument("--max-drop", type=_number(low=0, high=100, unit=" points"), default=None, metavar="P",
                   help="instead of a budget: the smallest model whose held-out top-1 (on --eval-data) stays within "
                        "P accuracy points of the unpruned model; the report lists every budget tried")
    _add_budget_options(p)
    _add_data_options(p)
    _add_label_options(p)
    _add_task_options(p)
    _add_ray_options(p)


def _add_measure_commands(parsers: dict[str, argparse.ArgumentParser]) -> None:
    """eval, bench, demo and run."""
    from pipeline.choices import MAX_ITERATIONS, MAX_ROUNDS, MAX_SECONDS

    p = parsers["eval"]
    p.add_argument("model", help="the .onnx file to evaluate")
    p.add_argument("--data", required=True, help="'mnist', an .npz or an image folder")
    p.add_argument("--reference", default=None, help="original model: adds its own top-1, agreement and relative "
                                                     "logit error; a dense output without labels is scored against "
                                                     "the reference's own decisions")
    p.add_argument("--robustness", action="store_true",
                   help="with --reference: top-1 and agreement under Gaussian noise and FGSM/PGD examples crafted "
                        "on the original (adversarial part needs the [torch] extra)")
    _add_data_options(p, evaluation=True)
    _add_label_options(p, evaluation=True)
    _add_task_options(p)

    seconds = _number(low=0, high=MAX_SECONDS, unit=" s")
    p = parsers["bench"]
    p.add_argument("models", nargs="+", help="the .onnx files; the first is the baseline of the ratios")
    p.add_argument("--backend", choices=BACKENDS, default="ort-cpu", help="where the models run")
    p.add_argument("--batch", type=_batches, default="1", help="comma-separated batch sizes, e.g. 1,8,32")
    p.add_argument("--data", default=None, help="inputs from an .npz instead of seeded random inputs")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="TensorRT engine precision")
    p.add_argument("--workdir", default=None, help="TensorRT: where engines and the timing cache are kept")
    p.add_argument("--json", default=None, help="write the full report here")
    p.add_argument("--warmup", type=seconds, default=1.0, help="warm-up seconds per model and batch")
    p.add_argument("--duration", type=seconds, default=3.0, help="minimum timed seconds per model and batch")
    p.add_argument("--iterations", type=_number(int, low=1, high=MAX_ITERATIONS), default=30,
                   help="minimum timed iterations")
    p.add_argument("--rounds", type=_number(int, low=1, high=MAX_ROUNDS), default=5,
                   help="interleaved rounds (A B A B ...)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="onnxruntime intra-op threads (default: onnxruntime's choice, one per physical core)")
    p.add_argument("--round-to", type=_positive_int, default=None,
                   help="warn about channel counts not multiples of N (default: from --backend/--precision)")

    parsers["demo"].add_argument("--work", default="work/demo", help="where the demo writes its files")

    p = parsers["run"]
    p.add_argument("config", help="the job file (YAML; see README, 'Use it in a pipeline')")
    p.add_argument("-o", "--output", default=None, help="output folder (default: the config's 'output')")
    p.add_argument("--mlflow", nargs="?", const="", default=None, metavar="URI",
                   help="log to MLflow (default store: sqlite:///OUTPUT/mlflow.db); needs the [mlflow] extra")
    p.add_argument("--no-cache", action="store_true", help="recompute everything; neither read nor write "
                                                           "OUTPUT/cache")


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


# ------------------------------------------------------------------------------------------- inputs and outputs

_INPUT_OPTIONS = ("config", "spec", "model", "models", "reference", "plan", "stats", "scores", "data", "eval_data",
                  "task_map", "latency_model")
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
    """Every file the command writes (``run`` writes a folder: :func:`pipeline.job.run.check_run_paths`)."""
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


# ------------------------------------------------------------------------------------------------------ signals


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


if __name__ == "__main__":
    sys.exit(main())

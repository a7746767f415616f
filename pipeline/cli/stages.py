"""The stage-by-stage commands: ``inspect`` (groups, sizes, MACs), ``calibrate``, ``score``, ``plan`` and ``apply``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from graph_ops.errors import UserInputError
from pipeline.choices import (
    DEFAULT_POOLING,
    POOLINGS,
    SCORERS,
)
from pipeline.cli.common import (
    _cluster,
    _dataset,
    _emit,
    _label_options,
    _latency_budget,
    _non_negative_int,
    _positive_int,
    _round_to,
    _shapes,
    _task,
    _warn,
)
from pipeline.cli.guard import _check_outputs
from pipeline.cli.options import (
    _add_budget_options,
    _add_data_options,
    _add_label_options,
    _add_ray_options,
    _add_task_options,
)


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

"""``diprune prune``: the one shot (calibrate, score, plan, apply, recover, report) and its options.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from graph_ops.errors import UserInputError
from pipeline.choices import (
    ALLOCATIONS,
    DEFAULT_ALLOCATION,
    DEFAULT_POOLING,
    DEFAULT_RECOVERY,
    DEFAULT_STEPS,
    POOLINGS,
    RECOVERY,
    SCORERS,
)
from pipeline.cli.common import (
    _cluster,
    _dataset,
    _emit,
    _eval_dataset,
    _label_options,
    _latency_budget,
    _latency_target,
    _non_negative,
    _non_negative_int,
    _number,
    _positive_int,
    _round_to,
    _shapes,
    _task,
    _warn,
)
from pipeline.cli.options import (
    _add_budget_options,
    _add_data_options,
    _add_label_options,
    _add_ray_options,
    _add_task_options,
)
from pipeline.cli.stages import (
    _latency_note,
)

logger = logging.getLogger("diprune")


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
    eval_data = _eval_dataset(args)
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


def _add_prune_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the .onnx file to prune (never modified)")
    p.add_argument("--data", default=None, help="calibration data: 'mnist', an .npz or an image folder")
    p.add_argument("--eval-data", default=None, help="held-out data for the report (test split by default)")
    p.add_argument("--eval-labels-path", default=None, metavar="PATH",
                   help="dense labels of --eval-data (a label folder or file, as --labels-path): the report's "
                        "mAP / mIoU / CER against them instead of against the original model's decisions")
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

"""The optional torch stages: ``diprune finetune`` (distillation after pruning) and ``diprune push``
(Grow-Push-Prune's push, then the prune).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graph_ops.errors import UserInputError
from pipeline.choices import (
    DEFAULT_RECOVERY,
    FINETUNE_DEFAULTS,
    PUSH_DEFAULTS,
    RECOVERY,
    SCORERS,
)
from pipeline.cli.common import (
    _dataset,
    _emit,
    _eval_dataset,
    _non_negative,
    _non_negative_int,
    _positive,
    _round_to,
    _share,
    _top1,
    _warn,
)
from pipeline.cli.export import _export_shape
from pipeline.cli.options import (
    _add_budget_options,
    _add_input_shape,
    _add_training_options,
)


def cmd_finetune(args: argparse.Namespace) -> int:
    from pipeline.training.finetune import FinetuneOptions, finetune_file

    options = FinetuneOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              temperature=args.temperature, ce_weight=args.ce_weight,
                              feature_weight=args.feature_weight, seed=args.seed, threads=args.threads,
                              validation=args.validation)
    eval_data = _eval_dataset(args)
    doc = finetune_file(args.model, args.reference, args.output, _dataset(args.data, args, split=args.split),
                        options, plan_path=args.plan, eval_data=eval_data, progress=not args.quiet)
    for note in doc["notes"]:
        _warn(args, note)
    record = doc["finetune"]
    if not record["kept"]:
        _warn(args, f"every epoch was worse than the input on the validation slice beyond its noise; {args.output} "
                    "has the input's weights (try --epochs or --lr)")
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
    eval_data = _eval_dataset(args)
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


def _push_source(args: argparse.Namespace, tmp: Path) -> str:
    """The ONNX file to push: the model path, or a torch spec exported first (``diprune export``'s checks)."""
    if args.model.endswith(".onnx") or Path(args.model).is_file() or ":" not in args.model:
        return args.model
    from pipeline.model.export_spec import export_spec

    name, shape = _export_shape(args)
    result = export_spec(args.model, tmp / "exported.onnx", input_shape=shape, input_name=name)
    _emit(args, result.parity.summary())
    return str(result.path)


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

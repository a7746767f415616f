"""Measuring and running: ``diprune eval`` (held-out metrics), ``bench`` (latency), ``demo`` and ``run`` (the
whole job from a YAML config).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from graph_ops.errors import UserInputError
from pipeline.choices import (
    BACKENDS,
    PRECISIONS,
)
from pipeline.cli.common import (
    _batches,
    _dataset,
    _emit,
    _eval_split,
    _label_options,
    _number,
    _positive_int,
    _round_to,
    _shapes,
    _shown,
    _task,
    _warn,
    _with_shapes,
)
from pipeline.cli.options import (
    _add_data_options,
    _add_label_options,
    _add_task_options,
)


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

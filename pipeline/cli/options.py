"""The option groups several commands share (data, task, labels, Ray, budgets, latency, training, input shapes,
verbosity) and the help formatter.
"""

from __future__ import annotations

import argparse
import importlib.metadata

from pipeline.choices import (
    BACKENDS,
    PRECISIONS,
)
from pipeline.cli.common import (
    _finite,
    _fraction,
    _non_negative,
    _non_negative_int,
    _nonzero,
    _positive,
    _positive_int,
    _task_classes,
)


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


def _add_input_shape(parser: argparse.ArgumentParser, *, export: bool = False) -> None:
    """``--input-shape [NAME:]DIMS``, one syntax on every subcommand (repeatable; DIMS alone: the single input)."""
    text = ("torch specs: the example input, e.g. input:1x3x224x224 or 1x3x224x224 (default: the architecture's; "
            "required for file.py)") if export else (
            "static dims of a model input, e.g. images:1x3x640x640, or 1x3x640x640 for a single-input model "
            "(repeatable); fixes dynamic sizes for shape inference, MACs, calibration and bench")
    parser.add_argument("--input-shape", action="append", default=[], metavar="[NAME:]DIMS", help=text)


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

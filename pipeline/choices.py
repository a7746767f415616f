"""The names and defaults the command line offers, in a module that imports nothing heavy.

The registries themselves (``pipeline.selection.scorers.SCORERS``, ``pipeline.recovery.RECOVERY``, ...) live with their code,
which imports onnx, onnxruntime or onnx-graphsurgeon; building the argument parser from them made every command,
``diprune --help`` included, pay for those imports (about 1 s on a 2-core machine, most of it onnx's ml_dtypes).
The parser reads the copies below instead, and a command imports its heavy modules when it runs.
``tests/unit/pipeline/test_choices.py`` checks that every copy equals its registry, so they cannot drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path

SCORERS = ("di", "lda", "lda-trace", "pls-vip", "l1", "l2", "mean-act", "apoz", "random")
"""Keys of ``pipeline.selection.scorers.SCORERS``."""
RECOVERY = ("none", "bias", "regress", "lstsq")
"""Keys of ``pipeline.recovery.RECOVERY``, in its order."""
DEFAULT_RECOVERY = "lstsq"
POOLINGS = ("auto", "gap", "avg2", "avg4")
"""Keys of ``pipeline.calibration.calibrate.POOLINGS``, in its order."""
DEFAULT_POOLING = "auto"
BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "tensorrt")
"""``pipeline.deployment.engines.BACKENDS``."""
PRECISIONS = ("fp32", "fp16", "int8")
"""``pipeline.deployment.engines.PRECISIONS``."""
ALLOCATIONS = ("measured", "rule")
"""``pipeline.prune.orchestrate.ALLOCATIONS``."""
DEFAULT_ALLOCATION = "measured"
DEFAULT_STEPS = 1
"""``pipeline.selection.progressive.DEFAULT_STEPS``."""
OUTPUT_KINDS = ("classes", "sequence", "map", "yolo")
"""Keys of ``pipeline.data.outputs.OUTPUT_KINDS``, in its order."""
MAP_THRESHOLD = 0.5
YOLO_CONF = 0.25
YOLO_IOU = 0.7
"""``pipeline.data.outputs``' thresholds of model labels."""
LABEL_SOURCES = ("data", "model")
"""``pipeline.data.targets.LABEL_SOURCES``."""
LABEL_FORMATS = ("yolo", "coco", "mask", "text")
"""``pipeline.data.labels.LABEL_FORMATS``."""
DEFAULT_PER_CLASS = 16
DEFAULT_BACKGROUND_RATIO = 1.0
"""``pipeline.data.locations``' defaults of the location sampling of dense labels."""
MAX_SECONDS = 3600.0
MAX_ITERATIONS = 1_000_000
MAX_ROUNDS = 1000
"""``pipeline.deployment.bench``'s bounds of one measurement."""
FINETUNE_DEFAULTS = {"epochs": 3, "batch_size": 32, "lr": 1e-3, "temperature": 4.0, "ce_weight": 0.5,
                     "feature_weight": 0.0, "validation": 0.1}
"""The defaults of ``pipeline.training.finetune.FinetuneOptions`` the CLI exposes."""
PUSH_DEFAULTS = {"epochs": 3, "batch_size": 128, "lr": 1e-3, "sep_weight": 1.0, "cov_weight": 1.0,
                 "align_weight": 1.0}
"""The defaults of ``pipeline.training.push.PushOptions`` the CLI exposes."""


def default_cache_dir() -> Path:
    """Where the CLI keeps latency models: ``$XDG_CACHE_HOME/diprune/latency`` (default ``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diprune" / "latency"

"""The command line's light copies of the registries (``pipeline.choices``) equal the registries, and importing the
CLI loads none of the heavy libraries that only its commands need."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from pipeline import choices


def _registries() -> list[tuple[str, object, object]]:
    from pipeline import recovery
    from pipeline.calibration import calibrate
    from pipeline.data import labels, locations, outputs, targets
    from pipeline.deployment import bench, engines
    from pipeline.prune import orchestrate
    from pipeline.selection import progressive, scorers

    return [
        ("SCORERS", choices.SCORERS, tuple(scorers.SCORERS)),
        ("RECOVERY", choices.RECOVERY, tuple(recovery.RECOVERY)),
        ("DEFAULT_RECOVERY", choices.DEFAULT_RECOVERY, recovery.DEFAULT_RECOVERY),
        ("POOLINGS", choices.POOLINGS, tuple(calibrate.POOLINGS)),
        ("DEFAULT_POOLING", choices.DEFAULT_POOLING, calibrate.DEFAULT_POOLING),
        ("BACKENDS", choices.BACKENDS, tuple(engines.BACKENDS)),
        ("PRECISIONS", choices.PRECISIONS, tuple(engines.PRECISIONS)),
        ("ALLOCATIONS", choices.ALLOCATIONS, tuple(orchestrate.ALLOCATIONS)),
        ("DEFAULT_ALLOCATION", choices.DEFAULT_ALLOCATION, orchestrate.DEFAULT_ALLOCATION),
        ("DEFAULT_STEPS", choices.DEFAULT_STEPS, progressive.DEFAULT_STEPS),
        ("OUTPUT_KINDS", choices.OUTPUT_KINDS, tuple(outputs.OUTPUT_KINDS)),
        ("MAP_THRESHOLD", choices.MAP_THRESHOLD, outputs.MAP_THRESHOLD),
        ("YOLO_CONF", choices.YOLO_CONF, outputs.YOLO_CONF),
        ("YOLO_IOU", choices.YOLO_IOU, outputs.YOLO_IOU),
        ("LABEL_SOURCES", choices.LABEL_SOURCES, tuple(targets.LABEL_SOURCES)),
        ("LABEL_FORMATS", choices.LABEL_FORMATS, tuple(labels.LABEL_FORMATS)),
        ("DEFAULT_PER_CLASS", choices.DEFAULT_PER_CLASS, locations.DEFAULT_PER_CLASS),
        ("DEFAULT_BACKGROUND_RATIO", choices.DEFAULT_BACKGROUND_RATIO, locations.DEFAULT_BACKGROUND_RATIO),
        ("MAX_SECONDS", choices.MAX_SECONDS, bench.MAX_SECONDS),
        ("MAX_ITERATIONS", choices.MAX_ITERATIONS, bench.MAX_ITERATIONS),
        ("MAX_ROUNDS", choices.MAX_ROUNDS, bench.MAX_ROUNDS),
    ]


def test_every_copy_equals_its_registry() -> None:
    wrong = [(name, copy, real) for name, copy, real in _registries() if copy != real]
    assert not wrong


@pytest.mark.parametrize(("defaults", "module", "cls"), [(choices.FINETUNE_DEFAULTS, "pipeline.training.finetune", "FinetuneOptions"),
                                                         (choices.PUSH_DEFAULTS, "pipeline.training.push", "PushOptions")])
def test_training_defaults_equal_the_options(defaults: dict, module: str, cls: str) -> None:
    import importlib

    fields = {f.name: f.default for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    assert defaults == {name: fields[name] for name in defaults}


def test_the_cli_and_its_parser_load_no_heavy_library() -> None:
    """``import pipeline.cli`` and building the whole parser (what ``diprune --help`` does) in a fresh interpreter."""
    heavy = ("onnx", "onnxruntime", "onnx_graphsurgeon", "ml_dtypes")
    code = ("import sys, pipeline.cli; pipeline.cli.build_parser(); "
            f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == []

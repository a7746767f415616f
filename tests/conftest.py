"""Shared fixtures: seeded rng, a work directory, a single-thread ORT session factory, the zoo model cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    """A freshly seeded generator (seed 0)."""
    return np.random.default_rng(0)


@pytest.fixture
def tmp_work(tmp_path: Path) -> Path:
    """A per-test work directory."""
    return tmp_path


@pytest.fixture
def ort_session() -> Callable[[str | Path | onnx.ModelProto], ort.InferenceSession]:
    """Factory: a CPU onnxruntime session (one thread) from a path or an in-memory model."""

    def make(model: str | Path | onnx.ModelProto) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    return make


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session-wide directory where exported zoo models are cached (see ``tests.models.export_zoo``)."""
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def zoo_model(zoo_cache: Path) -> Callable[[str, str], Path]:
    """Factory ``(name, exporter) -> path`` of a canonical zoo model, exported once per session."""
    from tests.models import export_zoo

    def get(name: str, exporter: str = "dynamo") -> Path:
        return export_zoo(name, exporter, zoo_cache)

    return get


@pytest.fixture(scope="session")
def small_cnn_onnx(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory ``exporter -> path``: ``tests.models.small_cnn()`` exported once per session by ``export_torch``.

    The example input is ``tests.models.SMALL_CNN_INPUT`` (seeded); the batch dimension is dynamic.
    """
    from tests.models import export_small_cnn

    directory = tmp_path_factory.mktemp("small_cnn")

    def get(exporter: str = "dynamo") -> Path:
        return export_small_cnn(exporter, directory)

    return get


@pytest.fixture(scope="session")
def production_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """Factory ``(name, exporter) -> path`` of a canonical production model (timm, Ultralytics), exported once per
    session; skips with the reason when the package is missing or the exporter fails on the architecture."""
    from tests.production_models import export_production, missing

    directory = tmp_path_factory.mktemp("production")
    failures: dict[tuple[str, str], str] = {}

    def get(name: str, exporter: str = "legacy") -> Path:
        reason = missing(name) or failures.get((name, exporter))
        if reason:
            pytest.skip(reason)
        from pipeline.errors import UserInputError

        try:
            return export_production(name, exporter, directory)
        except UserInputError as err:  # torch's exporter cannot handle the architecture: a skip that names why
            failures[(name, exporter)] = f"the {exporter} exporter fails on {name}: {str(err)[:200]}"
            pytest.skip(failures[(name, exporter)])

    return get

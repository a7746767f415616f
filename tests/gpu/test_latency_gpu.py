"""The latency model and the latency budget on onnxruntime's CUDA and TensorRT execution providers (skipped where
the provider is not really active: a CPU-only onnxruntime, or onnxruntime-gpu without a GPU)."""

from __future__ import annotations

import pytest

from pipeline.deployment.latency_build import build_latency_model
from pipeline.deployment.latency_model import LatencyTarget
from pipeline.errors import UserInputError
from pipeline.model.prepare import prepare
from pipeline.model.runtime import make_session
from pipeline.prune.demo import demo_model_path

pytestmark = pytest.mark.gpu


def _require(backend: str) -> None:
    try:
        make_session(str(demo_model_path()), backend)
    except UserInputError as err:
        pytest.skip(f"{backend} is not active here: {err}")


@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt"])
def test_latency_model_on_a_gpu_provider(backend: str) -> None:
    _require(backend)
    prepared = prepare(demo_model_path())
    model = build_latency_model(prepared, LatencyTarget(backend=backend, variants=4, rounds=3))
    assert model.key["backend"] == backend and model.key["block"] == 1
    assert model.ratio() == pytest.approx(1.0)
    assert all(c >= 0 for k in model.kernels for c in k.coef)


def test_without_the_provider_the_latency_model_says_why() -> None:
    try:
        make_session(str(demo_model_path()), "ort-cuda")
    except UserInputError:
        with pytest.raises(UserInputError, match="CUDAExecutionProvider"):
            build_latency_model(prepare(demo_model_path()), LatencyTarget(backend="ort-cuda"))
    else:
        pytest.skip("CUDA is active here; the refusal cannot be shown")

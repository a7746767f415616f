"""torch -> canonical ONNX export, and the seeded torchvision builder."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from graph_ops.io import verify_model
from pipeline.errors import UserInputError, VerificationError

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_export_is_canonical_and_matches_torch_at_other_batch(exporter: str, small_cnn_onnx, ort_session) -> None:
    import torch

    from tests.models import small_cnn

    path = small_cnn_onnx(exporter)
    model = onnx.load(str(path))
    verify_model(model)
    ops = Counter(node.op_type for node in model.graph.node)
    assert not set(ops) & {"BatchNormalization", "Identity", "Constant", "Dropout"}
    assert ops["Conv"] == 3 and ops["Gemm"] + ops["MatMul"] == 1
    batch = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    session = ort_session(path)
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    with torch.no_grad():
        expected = small_cnn()(batch).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_mismatch_with_torch_raises_verification_error(tmp_path: Path) -> None:
    import torch

    from pipeline.model.export import export_torch

    class CallCounter(torch.nn.Module):
        """Its output depends on how often it ran: the trace bakes in the first call."""

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return x * float(self.calls)

    with pytest.raises(VerificationError, match="max \\|error\\|"):
        export_torch(CallCounter(), torch.ones(1, 2), tmp_path / "m.onnx", dynamo=False)


def test_exporter_failure_is_a_user_error(tmp_path: Path) -> None:
    import torch

    from pipeline.model.export import export_torch

    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("cannot trace me")

    with pytest.raises(UserInputError, match=r"legacy export of Broken failed.*cannot trace me"):
        export_torch(Broken(), torch.ones(1, 2), tmp_path / "m.onnx", dynamo=False)
    assert not (tmp_path / "m.onnx").exists()


def test_load_torchvision_is_seeded_and_randomises_batchnorm() -> None:
    import torch

    from pipeline.model.export import load_torchvision

    a = load_torchvision("mobilenet_v3_small", num_classes=10, seed=3)
    b = load_torchvision("mobilenet_v3_small", num_classes=10, seed=3)
    assert not a.training
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    bn = next(m for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert a.classifier[-1].out_features == 10


def test_load_torchvision_googlenet_without_aux_and_unknown_name() -> None:
    from pipeline.model.export import load_torchvision

    net = load_torchvision("googlenet", num_classes=10)
    assert net.aux1 is None and net.aux2 is None
    with pytest.raises(UserInputError, match="unknown torchvision model"):
        load_torchvision("no_such_net")


def test_package_imports_without_torch() -> None:
    code = "import sys, pipeline.model.export, graph_ops.canonicalize, graph_ops.cost; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

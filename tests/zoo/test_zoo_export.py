"""Every zoo architecture, with both exporters: canonicalize keeps outputs, the result passes the full checker.

The raw export is compared with its canonical form (and the canonical form with torch) at ``rtol = 1e-4`` relative
to the largest output magnitude. The canonical model is written where ``tests.models.export_zoo`` caches it, so
later zoo tests of the same session reuse it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from graph_ops.canonicalize import canonicalize
from graph_ops.io import load_model, save_model, verify_model
from tests.models import EXPORTERS, ZOO, zoo_example, zoo_path

pytestmark = pytest.mark.zoo


def _outputs(session_factory, model: onnx.ModelProto | Path, feed: np.ndarray) -> list[np.ndarray]:
    session = session_factory(model)
    return session.run(None, {session.get_inputs()[0].name: feed})


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ZOO)
def test_canonicalize_keeps_outputs(name: str, exporter: str, zoo_cache: Path, tmp_path: Path, ort_session) -> None:
    import torch

    from pipeline.model.export import export_raw, load_torchvision

    model = load_torchvision(name, num_classes=10, seed=0)
    example = zoo_example(name)
    raw_path = tmp_path / "raw.onnx"
    export_raw(model, example, raw_path, dynamo=exporter == "dynamo")
    raw = load_model(raw_path)
    canonical = canonicalize(raw)
    verify_model(canonical)
    feed = example.numpy()
    before = _outputs(ort_session, raw, feed)
    after = _outputs(ort_session, canonical, feed)
    with torch.no_grad():
        expected = model(example).numpy()
    scale = float(np.max(np.abs(before[0])))
    assert len(after) == len(before)
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(after[0], expected, rtol=0, atol=1e-4 * scale)
    ops = {node.op_type for node in canonical.graph.node}
    assert not ops & {"Constant", "Identity", "Dropout"}
    target = zoo_path(name, exporter, zoo_cache)
    if not target.exists():
        save_model(canonical, target)


def test_cli_export_resnet18_with_default_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``diprune export torchvision:resnet18`` as documented: dynamo, 1x3x224x224, dynamic batch (about 15 s)."""
    from pipeline.cli import main

    out = tmp_path / "resnet18.onnx"
    assert main(["-q", "export", "torchvision:resnet18", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity torch vs onnxruntime" in printed and printed.splitlines()[0].endswith(": ok")
    verify_model(load_model(out))

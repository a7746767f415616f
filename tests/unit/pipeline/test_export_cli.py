"""``diprune export SPEC``: torchvision and file.py:factory specs pass their parity check; failures exit 3."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.cli import main

pytestmark = pytest.mark.slow  # each exports a torch model (2-10 s)

FACTORY = textwrap.dedent('''
    import torch


    def small_net():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(32, 10))


    class CallCounter(torch.nn.Module):
        """Its output depends on how often it ran: the trace bakes in the first call, torch does not."""

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * float(self.calls)


    def drifting():
        return CallCounter()


    def not_a_module():
        return 42
''')


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(FACTORY)
    return path


def _parity_line(out: str) -> str:
    line = next(line for line in out.splitlines() if line.startswith("parity torch vs onnxruntime"))
    return line


def _run_both(path: Path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def test_export_torchvision_resnet18_passes_parity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from pipeline.model.export import load_torchvision

    out = tmp_path / "resnet18.onnx"
    assert main(["-q", "export", "torchvision:resnet18", "-o", str(out), "--input-shape", "1x3x64x64",
                 "--exporter", "legacy"]) == 0
    line = _parity_line(capsys.readouterr().out)
    assert line.endswith(": ok")
    error = float(line.split("max |error| ")[1].split(" ")[0])
    assert error < 1e-4
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    batch = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))  # another batch size
    with torch.no_grad():
        expected = load_torchvision("resnet18")(batch).numpy()
    np.testing.assert_allclose(_run_both(out, batch.numpy()), expected, rtol=1e-3, atol=1e-4)


def test_export_file_factory_with_named_input(factory_file: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "net.onnx"
    assert main(["-q", "export", f"{factory_file}:small_net", "-o", str(out), "--input-shape", "image:1x3x16x16"]) == 0
    printed = capsys.readouterr().out
    assert _parity_line(printed).endswith(": ok")
    assert "input image:1x3x16x16 (dynamic batch), dynamo exporter, opset 18" in printed
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["image"]
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}  # canonical: BN folded
    assert main(["-q", "inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prunable_groups"] + info["protected_groups"] >= 2  # counted apart since issue 25


def test_parity_failure_exits_3_and_writes_nothing(factory_file: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "drift.onnx"
    code = main(["-q", "export", f"{factory_file}:drifting", "-o", str(out), "--input-shape", "1x4",
                 "--exporter", "legacy"])
    err = capsys.readouterr().err
    assert code == 3
    assert "parity torch vs onnxruntime" in err and "FAILED" in err and "nothing written" in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(("spec", "extra", "expected"), [
    ("keras:resnet", [], "unknown model spec"),
    ("{file}:small_net", [], "--input-shape"),
    ("{file}:missing", ["--input-shape", "1x3x8x8"], "small_net"),
    ("{file}:not_a_module", ["--input-shape", "1x3x8x8"], "not a torch.nn.Module"),
    ("torchvision:resnet18", ["--input-shape", "1xAx3"], "--input-shape '1xAx3'"),
    ("torchvision:no_such_net", [], "unknown torchvision model"),
    ("missing.py:f", ["--input-shape", "1x3"], "not found"),
], ids=["unknown-source", "file-without-shape", "missing-factory", "not-a-module", "bad-shape", "unknown-name",
        "missing-file"])
def test_export_user_errors(spec: str, extra: list[str], expected: str, factory_file: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.onnx"
    assert main(["-q", "export", spec.format(file=factory_file), "-o", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diprune: error:") and expected in err and "Traceback" not in err
    assert not out.exists()


def test_export_without_torch_names_the_extra(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['torch'] = None; from pipeline.cli import main; "
            f"sys.exit(main(['export', 'torchvision:resnet18', '-o', {str(tmp_path / 'o.onnx')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert "diprune[torch]" in result.stderr and "Traceback" not in result.stderr

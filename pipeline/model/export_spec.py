"""``diprune export SPEC``: a model named by a spec, exported to a canonical ONNX file and checked against torch.

Specs (:data:`SOURCES`):

* ``torchvision:NAME``: a ``torchvision.models`` architecture (:func:`pipeline.model.export.load_torchvision`: seeded
  random weights, randomised BatchNorm statistics; no pretrained weights are downloaded), default input
  ``1x3x224x224`` (``inception_v3``: ``1x3x299x299``);
* ``timm:NAME``: a timm model (``timm.create_model(NAME, pretrained=False)``, when timm is installed), default input
  from its ``pretrained_cfg["input_size"]``;
* ``path/to/file.py:FACTORY``: ``FACTORY()`` from that file, which must return a ``torch.nn.Module`` (load your
  weights inside it); the input shape must be given (``--input-shape``).

The example input is seeded standard-normal noise of the input shape; the parity check compares onnxruntime's
outputs with torch's on it (:class:`pipeline.model.export.Parity`) before anything is written. torch is imported only
when a spec is exported; without it the error names the ``[torch]`` extra.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserInputError
from pipeline.model.export import Parity, export_checked, import_torchvision_models, load_torchvision

TORCH_HINT = "pip install -c constraints.txt 'diprune[torch]' (PyTorch 2.13 CPU and torchvision; see README)"
_TORCHVISION_SHAPES = {"inception_v3": (1, 3, 299, 299)}


@dataclass(frozen=True)
class ExportResult:
    """What ``diprune export`` did: the spec, the file, the input it was exported with, and the parity check."""

    spec: str
    path: Path
    input_name: str
    input_shape: tuple[int, ...]
    opset: int
    exporter: str
    dynamic_batch: bool
    parity: Parity

    def summary(self) -> str:
        """One line for the CLI."""
        batch = "dynamic batch" if self.dynamic_batch else "static batch"
        shape = "x".join(str(d) for d in self.input_shape)
        return (f"wrote {self.path}: {self.spec}, input {self.input_name}:{shape} ({batch}), {self.exporter} "
                f"exporter, opset {self.opset}")


def parse_input_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """``NAME:1x3x224x224`` or ``1x3x224x224`` -> (name or None, dims); dims are positive integers."""
    name, _, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise UserInputError(f"input shape {text!r}: give NAME:DIMS or DIMS with positive dims joined by 'x', e.g. "
                             "input:1x3x224x224")
    return name or None, shape


def require_torch() -> Any:
    """``torch``, or a UserInputError naming the extra to install."""
    try:
        import torch
    except ImportError as err:
        raise UserInputError(f"exporting needs PyTorch, which is not installed: {TORCH_HINT}") from err
    return torch


def _torchvision(name: str) -> tuple[Any, tuple[int, ...] | None]:
    try:
        import_torchvision_models()
    except ImportError as err:
        raise UserInputError(f"torchvision:{name} needs torchvision, which is not installed: {TORCH_HINT}") from err
    return load_torchvision(name), _TORCHVISION_SHAPES.get(name, (1, 3, 224, 224))


def _timm(name: str) -> tuple[Any, tuple[int, ...] | None]:
    import_torchvision_models()  # timm imports torchvision; this makes it importable on CPU-only torch
    try:
        import timm
    except ImportError as err:
        raise UserInputError("timm: specs need timm, which is not installed: pip install --no-deps timm "
                             "(with the [torch] extra)") from err
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception as err:  # timm raises RuntimeError / KeyError for unknown names
        raise UserInputError(f"timm cannot build {name!r}: {err}; see timm.list_models()") from err
    size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", ()) or ())
    return model.eval(), ((1, *size) if len(size) == 3 else None)


def _factory(spec: str) -> tuple[Any, tuple[int, ...] | None]:
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise UserInputError(f"model file {file} not found (spec {spec!r}: path/to/file.py:FACTORY)")
    module_name = f"diprune_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    try:
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)  # type: ignore[arg-type]
        sys.modules[module_name] = module
        loader.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as err:  # the user's code may raise anything
        raise UserInputError(f"cannot import {file}: {type(err).__name__}: {err}") from err
    factory = getattr(module, name, None)
    if not callable(factory):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise UserInputError(f"{file} has no function {name!r}; it defines {', '.join(found) or 'none'}")
    try:
        model = factory()
    except Exception as err:  # the user's code may raise anything
        raise UserInputError(f"{file}:{name}() failed: {type(err).__name__}: {err}") from err
    torch = require_torch()
    if not isinstance(model, torch.nn.Module):
        raise UserInputError(f"{file}:{name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model, None


SOURCES: dict[str, Callable[[str], tuple[Any, tuple[int, ...] | None]]] = {
    "torchvision": _torchvision,
    "timm": _timm,
}
"""Spec prefix -> builder of (module, default input shape); ``*.py:FACTORY`` specs are files."""


def load_spec(spec: str) -> tuple[Any, tuple[int, ...] | None]:
    """The torch module a spec names and its default input shape (None: the spec has none)."""
    prefix, _, rest = spec.partition(":")
    if prefix in SOURCES and rest:
        require_torch()
        return SOURCES[prefix](rest)
    if spec.rpartition(":")[0].endswith(".py"):
        require_torch()
        return _factory(spec)
    raise UserInputError(f"unknown model spec {spec!r}: give torchvision:NAME, timm:NAME or path/to/file.py:FACTORY")


def spec_identity(spec: str) -> str:
    """What the spec's model depends on, for caches: the spec, plus the sha256 of a ``file.py``."""
    file = spec.rpartition(":")[0]
    if file.endswith(".py") and Path(file).is_file():
        return f"{spec} sha256={hashlib.sha256(Path(file).read_bytes()).hexdigest()}"
    return spec


def export_spec(spec: str, path: str | os.PathLike[str], *, input_shape: Sequence[int] | None = None,
                input_name: str | None = None, opset: int = 17, dynamic_batch: bool = True, exporter: str = "dynamo",
                rtol: float = 1e-3, atol: float = 1e-4, seed: int = 0) -> ExportResult:
    """Export the model a spec names to ``path``, canonical and checked against torch (module docstring).

    Raises:
        UserInputError: bad spec, torch (or timm) missing, no input shape for a file spec, exporter failure.
        VerificationError: the parity check failed (exit code 3; nothing is written).
    """
    if exporter not in ("dynamo", "legacy"):
        raise UserInputError(f"unknown exporter {exporter!r}; choose dynamo or legacy")
    model, default_shape = load_spec(spec)
    shape = tuple(input_shape) if input_shape else default_shape
    if not shape:
        raise UserInputError(f"{spec}: give the input shape, e.g. --input-shape input:1x3x224x224")
    torch = require_torch()
    example = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    name = input_name or "input"
    result = export_checked(model, example, path, opset=opset, dynamo=exporter == "dynamo",
                            dynamic_batch=dynamic_batch, input_name=name, rtol=rtol, atol=atol)
    assert result is not None  # checked exports return their parity
    opset = max(opset, 18) if exporter == "dynamo" else opset  # what export_raw asks the dynamo exporter for
    return ExportResult(spec=spec, path=Path(path), input_name=name, input_shape=tuple(shape), opset=opset,
                        exporter=exporter, dynamic_batch=dynamic_batch, parity=result)

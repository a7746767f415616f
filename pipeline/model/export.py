"""Export a torch module to a canonical ONNX file, checked against torch.

``export_torch`` puts the module in eval mode, exports it with the chosen exporter (dynamo by default, written as a
single file; or the legacy TorchScript exporter), loads the result, runs :func:`graph_ops.canonicalize.canonicalize`
(which, among others, fuses BatchNorm and gives every Conv its own bias), with ``check`` compares onnxruntime's
outputs with torch's on the example input (:func:`parity`, ``rtol=1e-3, atol=1e-4``) and only then saves it
atomically, so a model that fails the check is never written. The ``diprune export SPEC`` side (``torchvision:``,
``timm:`` and ``file.py:factory`` specs, input shapes) is :mod:`pipeline.model.export_spec`.

``load_torchvision`` builds a torchvision architecture with seeded random weights and randomised BatchNorm running
statistics (so that BN folding is exercised), because no pretrained weights are available offline.

torch and torchvision are imported inside the functions: the package imports without them.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from graph_ops.canonicalize import canonicalize
from graph_ops.io import load_model, save_model
from pipeline.errors import UserInputError, VerificationError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_NO_AUX = ("googlenet", "inception_v3")


def export_raw(model: Any, example: Any, path: Path, *, opset: int = 17, dynamo: bool = True,
               dynamic_batch: bool = True, input_name: str = "input", dynamic_spatial: bool = False) -> None:
    """Run a torch exporter only (no canonicalization, no check): one ``.onnx`` file, input ``input_name``.

    ``dynamic_spatial`` makes the input's height and width symbolic too (an export for any image size).

    The dynamo exporter is asked for at least opset 18, the lowest it implements with torch 2.13 (its conversion
    down to 17 fails on ReduceMean and keeps 18 anyway, after a slow attempt).
    """
    import warnings

    import torch

    names = {"input_names": [input_name], "output_names": ["output"]}
    if dynamo:
        dims = {**({0: torch.export.Dim.DYNAMIC} if dynamic_batch else {}),
                **({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC} if dynamic_spatial else {})}
        shapes = (dims,) if dims else None
        with warnings.catch_warnings():  # torch's own deprecation notices about its internals are not the user's
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(model, (example,), str(path), opset_version=max(opset, 18), dynamo=True,
                              external_data=False, dynamic_shapes=shapes, verbose=False, **names)
    else:
        spatial = {2: "height", 3: "width"} if dynamic_spatial else {}
        axes = {input_name: {**({0: "batch"} if dynamic_batch else {}), **spatial},
                "output": {0: "batch"} if dynamic_batch else {}} if dynamic_batch or dynamic_spatial else None
        with warnings.catch_warnings():  # the legacy exporter is deprecated, on purpose here
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), str(path), opset_version=opset, dynamo=False, dynamic_axes=axes,
                              **names)


def _torch_outputs(model: Any, example: Any) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = model(example)
    items = out if isinstance(out, (tuple, list)) else [out]
    return [t.detach().cpu().numpy() for t in items]


@dataclass(frozen=True)
class Parity:
    """torch against onnxruntime on one input: the worst output difference and the verdict.

    ``passed`` when every output has torch's shape and ``|ort - torch| <= atol + rtol * |torch|`` elementwise
    (``numpy.allclose``); ``max_abs_error`` is the largest ``|ort - torch|``, ``max_rel_error`` that over the largest
    ``|torch|`` of its output.
    """

    max_abs_error: float
    max_rel_error: float
    rtol: float
    atol: float
    passed: bool
    detail: str = ""

    def summary(self) -> str:
        """One line for the CLI."""
        verdict = "ok" if self.passed else f"FAILED{': ' + self.detail if self.detail else ''}"
        return (f"parity torch vs onnxruntime: max |error| {self.max_abs_error:.3g} (relative "
                f"{self.max_rel_error:.3g}; tolerance rtol {self.rtol:g}, atol {self.atol:g}): {verdict}")


def parity(model_bytes: bytes, example: np.ndarray, expected: list[np.ndarray], *, rtol: float = 1e-3,
           atol: float = 1e-4) -> Parity:
    """Compare onnxruntime's outputs of a serialized model on ``example`` with ``expected`` (torch's outputs)."""
    from pipeline.model.runtime import make_session

    session, _ = make_session(model_bytes, "ort-cpu", intra_op_threads=1)
    got = session.run(None, {session.get_inputs()[0].name: example})
    worst_abs, worst_rel, passed = 0.0, 0.0, len(got) == len(expected)
    detail = "" if passed else f"{len(got)} outputs, torch gives {len(expected)}"
    for index, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a.shape != b.shape:
            passed, detail = False, f"output {index} has shape {a.shape}, torch gives {b.shape}"
            worst_abs = worst_rel = float("inf")
            continue
        err = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-12))
        if not np.allclose(a, b, rtol=rtol, atol=atol):
            passed, detail = False, detail or f"output {index} differs"
    return Parity(worst_abs, worst_rel, rtol, atol, passed, detail)


def export_checked(model: Any, example_input: Any, path: str | os.PathLike[str], *, opset: int = 17,
                   dynamo: bool = True, dynamic_batch: bool = True, input_name: str = "input", check: bool = True,
                   rtol: float = 1e-3, atol: float = 1e-4, dynamic_spatial: bool = False) -> Parity | None:
    """:func:`export_torch` with the input name and tolerances chosen; returns the parity check (None unchecked).

    Raises:
        UserInputError: the exporter failed.
        VerificationError: the parity check failed (nothing is written; the message holds the errors).
    """
    model.eval()
    try:  # before exporting: an exporter may leave the module traced
        expected = _torch_outputs(model, example_input) if check else []
    except Exception as err:  # the user's module, any error type
        kind = "dynamo" if dynamo else "legacy"
        raise UserInputError(f"torch {kind} export of {type(model).__name__} failed: running it on the example "
                             f"input raised {type(err).__name__}: {err}") from err
    with tempfile.TemporaryDirectory(prefix="diprune-export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            export_raw(model, example_input, raw, opset=opset, dynamo=dynamo, dynamic_batch=dynamic_batch,
                       input_name=input_name, dynamic_spatial=dynamic_spatial)
        except Exception as err:  # torch raises many unrelated types from its exporters
            kind = "dynamo" if dynamo else "legacy"
            raise UserInputError(f"torch {kind} export of {type(model).__name__} failed: {err}") from err
        canonical = canonicalize(load_model(raw))
    result = None
    if check:
        example = example_input.detach().cpu().numpy()
        result = parity(canonical.SerializeToString(), example, expected, rtol=rtol, atol=atol)
        if not result.passed:
            raise VerificationError(f"exported {type(model).__name__} differs from torch, nothing written: "
                                    f"{result.summary()}")
    save_model(canonical, path)
    logger.info("exported %s to %s (%d nodes)", type(model).__name__, path, len(canonical.graph.node))
    return result


def export_torch(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    opset: int = 17,
    dynamo: bool = True,
    dynamic_batch: bool = True,
    dynamic_spatial: bool = False,
    check: bool = True,
) -> Path:
    """Export ``model`` to a canonical single-file ONNX model at ``path``.

    Args:
        model: the module; it is switched to eval mode.
        example_input: one input tensor (its shape fixes every dim but, with ``dynamic_batch``, the batch).
        path: where to write the ``.onnx`` file (atomically).
        opset: ONNX opset to export with (the dynamo exporter uses at least 18).
        dynamo: use the dynamo exporter (default) instead of the legacy TorchScript one.
        dynamic_batch: make the batch dimension symbolic.
        dynamic_spatial: make the input's height and width symbolic too.
        check: compare onnxruntime's outputs with torch's (``rtol=1e-3, atol=1e-4``) before writing.

    Returns:
        The path written (nothing is written when the check fails).

    Raises:
        UserInputError: the exporter failed (the message carries torch's reason).
        VerificationError: the exported model disagrees with torch, or fails the ONNX checker.
    """
    export_checked(model, example_input, path, opset=opset, dynamo=dynamo, dynamic_batch=dynamic_batch,
                   dynamic_spatial=dynamic_spatial, check=check)
    return Path(path)


def import_torchvision_models() -> types.ModuleType:
    """``torchvision.models``, importable on CPU-only torch (registers an empty ``_meta_registrations``)."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision.models

    return torchvision.models


def load_torchvision(name: str, num_classes: int = 1000, seed: int = 0) -> torch.nn.Module:
    """A torchvision architecture with seeded random weights and randomised BN statistics, in eval mode.

    Args:
        name: a ``torchvision.models`` builder name, e.g. ``"resnet18"``.
        num_classes: size of the classifier head.
        seed: seeds weight init and the BN statistics.

    Returns:
        The module in eval mode.

    Raises:
        UserInputError: unknown architecture name.
    """
    import torch

    models = import_torchvision_models()
    try:
        builder = models.get_model_builder(name)
    except ValueError as err:
        raise UserInputError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()") from err
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in _NO_AUX:
        kwargs.update(aux_logits=False, init_weights=True)
    torch.manual_seed(seed)
    model = builder(**kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(torch.empty(module.running_var.shape).uniform_(0.5, 2.0, generator=generator))
                if module.affine:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model.eval()

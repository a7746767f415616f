"""Production architectures for the zoo suite: timm backbones and Ultralytics detectors, random weights.

These need optional packages (``timm``, ``ultralytics``; see README "Development"); :func:`missing` names what is
absent so tests can skip with a reason. Every model gets seeded random weights and randomised BatchNorm running
statistics (so BN folding is exercised); Ultralytics models are built from their YAML definitions (no weights are
downloaded) and exported in deployment form (``export = True`` on the Detect head).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TIMM = ("regnety_002", "resnext50_32x4d", "mixnet_m", "ghostnetv2_100", "cspdarknet53", "res2net50_14w_8s")
ULTRALYTICS = ("yolov8n", "yolo11n")
PRODUCTION = TIMM + ULTRALYTICS
EXPORTERS = ("legacy", "dynamo")
_SHAPES = {"yolov8n": (1, 3, 160, 160), "yolo11n": (1, 3, 160, 160)}
_OPTIONS = {"vit_tiny_patch16_224": {"img_size": 64}}  # timm options so that a model runs at its input_shape


def package_of(name: str) -> str:
    """The optional package a production model needs."""
    return "ultralytics" if name in ULTRALYTICS else "timm"


def missing(name: str) -> str | None:
    """Why a production model cannot be built here (a missing package), or None."""
    package = package_of(name)
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed (pip install -c constraints.txt --no-deps {package}; see README)"
    return None


def input_shape(name: str) -> tuple[int, int, int, int]:
    """NCHW input shape used for a production model (batch 1)."""
    return _SHAPES.get(name, (1, 3, 64, 64))


def _torchvision_import_fix() -> None:
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


def randomise_batchnorm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every BatchNorm random running statistics and shifts (seeded), in place; returns the model in eval."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(torch.empty(module.running_var.shape).uniform_(0.5, 2.0,
                                                                                        generator=generator))
                if module.affine:
                    module.weight.copy_(torch.empty(module.weight.shape).uniform_(0.5, 1.5, generator=generator))
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model.eval()


def randomise_layer_scales(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every layer-scale parameter (ConvNeXt / EdgeNeXt ``gamma``, a ViT's ``ls*.gamma``, MetaFormer's
    ``layer_scale*.scale``) seeded values in [0.5, 1.5], in place: initialised at 1e-6 they make a block's branch
    invisible in float32 outputs, and an exactness check would then compare nothing there."""
    import torch

    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma" or (leaf == "scale" and "layer_scale" in name):
                param.copy_(torch.empty(param.shape).uniform_(0.5, 1.5, generator=generator))
    return model


def build(name: str, seed: int = 0, **options: object) -> torch.nn.Module:
    """A production architecture with seeded random weights, randomised BN statistics, in eval (export) mode
    (``options``: keyword arguments of ``timm.create_model``, e.g. a ViT's ``img_size``)."""
    import torch

    _torchvision_import_fix()
    torch.manual_seed(seed)
    if name in ULTRALYTICS:
        from ultralytics.nn.tasks import DetectionModel

        model = DetectionModel(f"{name}.yaml", nc=80, verbose=False)
        for module in model.modules():
            if hasattr(module, "export") and type(module).__name__ in ("Detect", "Segment", "Pose", "OBB"):
                module.export = True
                module.format = "onnx"
    else:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10, **{**_OPTIONS.get(name, {}), **options})
    return randomise_batchnorm(randomise_layer_scales(model, seed), seed)


def example(name: str) -> torch.Tensor:
    """The seeded example input of a production model."""
    import torch

    return torch.randn(input_shape(name), generator=torch.Generator().manual_seed(0))


def export_production(name: str, exporter: str, cache_dir: str | Path) -> Path:
    """Export (once) the canonical ONNX model of a production architecture into ``cache_dir``."""
    from pipeline.model.export import export_torch

    path = Path(cache_dir) / f"{name}-{exporter}.onnx"
    if not path.exists():  # Ultralytics heads compute anchors from the batch too: a static batch keeps every size static
        export_torch(build(name), example(name), path, dynamo=exporter == "dynamo", check=True,
                     dynamic_batch=name not in ULTRALYTICS)
    return path

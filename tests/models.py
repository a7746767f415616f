"""Real-model builders for tests: the torchvision zoo (exported once per session) and small torch CNNs.

Input sizes are chosen small to keep the zoo fast on two cores, while valid for every architecture:
``1x3x64x64`` for all models except ``vgg16_bn`` (``1x3x224x224``: its adaptive pool to 7x7 needs a 7x7 feature map
for the legacy exporter) and ``inception_v3`` (``1x3x96x96``: the architecture needs at least 75x75). Every zoo model
is built with ``num_classes=10`` (small head), seeded random weights and randomised BatchNorm statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ZOO = (
    "resnet18",
    "resnet50",
    "vgg16_bn",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "googlenet",
    "inception_v3",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
    "squeezenet1_0",
)
EXPORTERS = ("legacy", "dynamo")
_SPECIAL_SHAPES = {"vgg16_bn": (1, 3, 224, 224), "inception_v3": (1, 3, 96, 96)}


def input_shape(name: str) -> tuple[int, int, int, int]:
    """The input shape used for a zoo model (NCHW, batch 1)."""
    return _SPECIAL_SHAPES.get(name, (1, 3, 64, 64))


def zoo_path(name: str, exporter: str, cache_dir: str | Path) -> Path:
    """Where :func:`export_zoo` caches a model: ``<cache_dir>/<name>-<exporter>.onnx``."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; one of {ZOO}")
    return Path(cache_dir) / f"{name}-{exporter}.onnx"


def zoo_example(name: str) -> torch.Tensor:
    """The seeded example input of a zoo model."""
    import torch

    return torch.randn(input_shape(name), generator=torch.Generator().manual_seed(0))


def export_zoo(name: str, exporter: str, cache_dir: str | Path) -> Path:
    """Export (once) the canonical ONNX model of a zoo architecture into ``cache_dir``.

    Args:
        name: one of :data:`ZOO`.
        exporter: ``"legacy"`` or ``"dynamo"``.
        cache_dir: directory for the cached files (``<name>-<exporter>.onnx``).

    Returns:
        The path of the canonical model (already checked against torch by ``export_torch``).
    """
    from pipeline.model.export import export_torch, load_torchvision

    path = zoo_path(name, exporter, cache_dir)
    if not path.exists():
        model = load_torchvision(name, num_classes=10, seed=0)
        export_torch(model, zoo_example(name), path, dynamo=exporter == "dynamo", check=True)
    return path


def small_cnn(
    in_channels: int = 3,
    width: int = 8,
    num_classes: int = 10,
    *,
    bias: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """A tiny conv net (conv-BN-ReLU x2, residual add, depthwise conv, concat, GAP, linear) with random BN stats.

    Args:
        in_channels: input channels.
        width: channels of the first conv.
        num_classes: outputs of the linear head.
        bias: whether convs have their own bias (exporters may drop or share them otherwise).
        seed: seeds weights and BN statistics.

    Returns:
        The module in eval mode.
    """
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=bias), nn.BatchNorm2d(width),
                                      nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=bias), nn.BatchNorm2d(width))
            self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=bias)
            self.head = nn.Linear(2 * width, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            y = torch.relu(self.body(x) + x)
            z = torch.cat([y, self.dw(y)], dim=1)
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1))

    torch.manual_seed(seed)
    model = SmallCNN()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.normal_(0.0, 0.2)
    return model.eval()


SMALL_CNN_INPUT = (1, 3, 8, 8)


def small_cnn_example() -> torch.Tensor:
    """The seeded example input of :func:`small_cnn` used by :func:`export_small_cnn`."""
    import torch

    return torch.randn(SMALL_CNN_INPUT, generator=torch.Generator().manual_seed(0))


def export_small_cnn(exporter: str, cache_dir: str | Path) -> Path:
    """Export (once) ``small_cnn()`` (default arguments) with ``export_torch`` to ``<cache_dir>/small_cnn-<exporter>.onnx``."""
    from pipeline.model.export import export_torch

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(cache_dir) / f"small_cnn-{exporter}.onnx"
    if not path.exists():
        export_torch(small_cnn(), small_cnn_example(), path, dynamo=exporter == "dynamo", check=True)
    return path

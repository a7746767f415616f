"""Torch model families for MNIST: the shipped demo model and the four quality-benchmark families.

Every model takes ``[N, 1, 28, 28]`` float input normalised as ``(x / 255 - 0.1307) / 0.3081`` and returns ``[N, 10]``
logits. The families cover the graph constructs that channel pruning must handle:

* ``demo`` (about 160k params): conv-BN-ReLU chain, one residual block (coupled channels through ``Add``) and a
  ``Flatten -> Linear`` head, so one channel of the last conv owns a block of H*W = 9 features of the first Linear.
* ``vgg`` (about 1.2M): plain chain of 3x3 convs with max pooling, GAP head.
* ``resnet`` (about 0.9M): basic residual blocks with 1x1 projection shortcuts and identity blocks.
* ``mobilenet`` (about 0.9M): MobileNetV2 inverted residuals (1x1 expand, 3x3 depthwise, 1x1 linear project).
* ``inception`` (about 0.8M): GoogLeNet-style modules whose four branches are concatenated on the channel axis.
* ``lenet`` (about 1.2M): Conv 32 -> Conv 64 -> MaxPool -> Flatten -> Linear 128 -> Linear 10, the plain small
  classifier whose Flatten -> Linear head reads every spatial position of the last conv.

This module imports torch at import time; it is a benchmark script helper, not part of the runtime package.
"""

from __future__ import annotations

import torch
from torch import nn

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def conv_bn(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Return Conv2d (same padding, no bias) -> BatchNorm2d -> optional ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, shortcut (identity or 1x1 conv-BN projection), Add, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        """Build the block; a projection shortcut is used when the shape changes."""
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, act=False))
        self.short = (
            nn.Identity() if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride, act=False)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return relu(body(x) + shortcut(x))."""
        return self.relu(self.body(x) + self.short(x))


class DemoNet(nn.Module):
    """The shipped demo model: chain, one residual block, Flatten -> Linear -> ReLU -> Linear head."""

    def __init__(self) -> None:
        """Build the layers (about 160k parameters)."""
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, 16), conv_bn(16, 32), nn.MaxPool2d(2))  # 14x14
        self.block = BasicBlock(32, 32)
        self.mid = nn.Sequential(nn.MaxPool2d(2), conv_bn(32, 64), conv_bn(64, 64), nn.MaxPool2d(2))  # 3x3
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.ReLU(inplace=True), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits."""
        return self.head(self.mid(self.block(self.stem(x))))


def _gap_head(cin: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def vgg() -> nn.Module:
    """VGG-style chain: 32 | 64,64 | 128,128 | 256,256 at 28/14/7/3 pixels, GAP head."""
    return nn.Sequential(
        conv_bn(1, 32), nn.MaxPool2d(2),
        conv_bn(32, 64), conv_bn(64, 64), nn.MaxPool2d(2),
        conv_bn(64, 128), conv_bn(128, 128), nn.MaxPool2d(2),
        conv_bn(128, 256), conv_bn(256, 256),
        _gap_head(256),
    )  # fmt: skip


def resnet() -> nn.Module:
    """ResNet-style: stem, identity and projection basic blocks at 14/7/4 pixels, GAP head."""
    return nn.Sequential(
        conv_bn(1, 32), nn.MaxPool2d(2),
        BasicBlock(32, 32), BasicBlock(32, 64, 2),
        BasicBlock(64, 128, 2), BasicBlock(128, 192),
        _gap_head(192),
    )  # fmt: skip


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear project, Add when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        """Build the block."""
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]  # fmt: skip
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return body(x) (+ x when the block is residual)."""
        return x + self.body(x) if self.residual else self.body(x)


def mobilenet() -> nn.Module:
    """MobileNetV2-style, stride-2 stem then (expand, channels, repeats, stride) = (1,16,1,1) (6,32,2,2) (6,64,3,1) (6,96,2,2) (6,160,2,1)."""
    config = ((1, 16, 1, 1), (6, 32, 2, 2), (6, 64, 3, 1), (6, 96, 2, 2), (6, 160, 2, 1))
    layers: list[nn.Module] = [
        nn.Conv2d(1, 32, 3, 2, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU6(inplace=True),
    ]
    cin = 32
    for expand, cout, repeats, stride in config:
        for i in range(repeats):
            layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    layers += [
        nn.Conv2d(cin, 640, 1, bias=False),
        nn.BatchNorm2d(640),
        nn.ReLU6(inplace=True),
        _gap_head(640),
    ]
    return nn.Sequential(*layers)


class InceptionModule(nn.Module):
    """GoogLeNet module: 1x1 | 1x1->3x3 | 1x1->5x5 | maxpool3->1x1, concatenated on channels."""

    def __init__(self, cin: int, b1: int, b2r: int, b2: int, b3r: int, b3: int, b4: int) -> None:
        """Build the four branches."""
        super().__init__()
        self.b1 = conv_bn(cin, b1, 1)
        self.b2 = nn.Sequential(conv_bn(cin, b2r, 1), conv_bn(b2r, b2, 3))
        self.b3 = nn.Sequential(conv_bn(cin, b3r, 1), conv_bn(b3r, b3, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, b4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the channel concatenation of the branches."""
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


def inception() -> nn.Module:
    """Inception-style: stem, modules at 14, 7, 7 and 3 pixels, GAP head (outputs 120, 240, 384, 448 channels)."""
    return nn.Sequential(
        conv_bn(1, 32), nn.MaxPool2d(2),
        InceptionModule(32, 32, 32, 48, 16, 24, 16),
        nn.MaxPool2d(2),
        InceptionModule(120, 64, 64, 96, 24, 48, 32),
        InceptionModule(240, 96, 96, 160, 32, 64, 64),
        nn.MaxPool2d(2),
        InceptionModule(384, 128, 128, 192, 32, 64, 64),
        _gap_head(448),
    )  # fmt: skip


def lenet() -> nn.Module:
    """LeNet-style plain CNN (the common small production classifier): Conv 32 (3x3) -> ReLU -> Conv 64 (3x3) ->
    ReLU -> MaxPool 2 -> Flatten (64 x 12 x 12) -> Linear 128 -> ReLU -> Linear 10; no BatchNorm, no padding."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(inplace=True), nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 12 * 12, 128), nn.ReLU(inplace=True), nn.Linear(128, 10),
    )  # fmt: skip


FAMILIES = {
    "demo": DemoNet,
    "resnet": resnet,
    "inception": inception,
    "vgg": vgg,
    "mobilenet": mobilenet,
    "lenet": lenet,
}


def build(family: str) -> nn.Module:
    """Return a freshly initialised model of ``family`` (initialisation follows the current torch seed)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    return FAMILIES[family]()


def count_params(model: nn.Module) -> int:
    """Return the number of trainable parameters (BatchNorm affine included, running stats excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module) -> int:
    """Return multiply-accumulates of Conv2d and Linear layers for one 1x28x28 image (forward hooks)."""
    total = 0

    def hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.weight[0].numel()  # (C_in / groups) * kh * kw
            total += int(output[0].numel()) * kernel
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    model.train(was_training)
    for handle in handles:
        handle.remove()
    return total

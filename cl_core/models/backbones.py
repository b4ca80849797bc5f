"""Backbones: every encoder is built here, in one place.

``build_backbone(name, ...)`` returns ``(module, feat_dim)``; the module maps images
(N, C, H, W) to features h (N, feat_dim) with the classifier removed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models as tvm

BACKBONES: dict[str, Callable[..., tuple[nn.Module, int]]] = {}


def _register(name: str):
    def deco(fn):
        BACKBONES[name] = fn
        return fn

    return deco


class SmallCNN(nn.Module):
    """A four-block conv net (conv-BN-ReLU, stride-2 downsampling, global pool).

    Meant for small images (8-64 px) on CPU: at 32 px it trains at several hundred
    images per second on two cores, which keeps the default pipeline and the tests fast.
    """

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


@_register("small_cnn")
def _small_cnn(in_channels: int = 3, width: int = 32, **_: object) -> tuple[nn.Module, int]:
    m = SmallCNN(in_channels=in_channels, width=width)
    return m, m.out_dim


def _resnet(arch: str, in_channels: int, cifar_stem: bool) -> tuple[nn.Module, int]:
    m = getattr(tvm, arch)(weights=None)
    if cifar_stem:
        # SimCLR appendix B.9: for 32 px images replace the 7x7 stride-2 conv with a
        # 3x3 stride-1 conv and drop the first max-pool.
        m.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        m.maxpool = nn.Identity()
    elif in_channels != 3:
        m.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    feat_dim = m.fc.in_features
    m.fc = nn.Identity()
    return m, feat_dim


@_register("resnet18")
def _resnet18(in_channels: int = 3, cifar_stem: bool = False, **_: object) -> tuple[nn.Module, int]:
    return _resnet("resnet18", in_channels, cifar_stem)


@_register("resnet50")
def _resnet50(in_channels: int = 3, cifar_stem: bool = False, **_: object) -> tuple[nn.Module, int]:
    return _resnet("resnet50", in_channels, cifar_stem)


def build_backbone(
    name: str, *, in_channels: int = 3, cifar_stem: bool = False, width: int = 32
) -> tuple[nn.Module, int]:
    """Build a backbone by name: ``small_cnn``, ``resnet18`` or ``resnet50``.

    Args:
        name: registry key.
        in_channels: channels of the input images.
        cifar_stem: ResNets only: 3x3 stride-1 first conv and no max-pool (small images).
        width: small_cnn only: channels of the first block.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](in_channels=in_channels, cifar_stem=cifar_stem, width=width)

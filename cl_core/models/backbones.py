"""Backbones: every encoder is built here, in one place.

``build_backbone(name, ...)`` returns ``(module, feat_dim)``; the module maps images
(N, C, H, W) to features h (N, feat_dim) with the classifier removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

BACKBONES: dict[str, Callable[..., tuple[nn.Module, int]]] = {}

_Builder = TypeVar("_Builder", bound=Callable[..., tuple[nn.Module, int]])


def _register(name: str) -> Callable[[_Builder], _Builder]:
    def deco(fn: _Builder) -> _Builder:
        BACKBONES[name] = fn
        return fn

    return deco


class SmallCNN(nn.Module):
    """A four-block conv net (conv-BN-ReLU, stride-2 downsampling, global pool).

    Meant for small images (8-64 px) on CPU: at 32 px it trains at several hundred
    images per second on two cores, which keeps the default pipeline and the tests fast.
    The blocks have ``width``, 2, 4 and 4 x ``width`` channels; ``out_width`` sets the
    last block's (the features' dimension) alone, where the last block is the cheapest
    to widen (it runs at 1/8 of the input's side).
    """

    def __init__(self, in_channels: int = 3, width: int = 32, out_width: int | None = None) -> None:
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, out_width or 4 * width]
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
def _small_cnn(
    in_channels: int = 3, width: int = 32, out_width: int | None = None, **_: object
) -> tuple[nn.Module, int]:
    m = SmallCNN(in_channels=in_channels, width=width, out_width=out_width)
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


class VisionTransformer(nn.Module):
    """A ViT encoder [0] returning the final [CLS] token (after LayerNorm).

    Patch embedding (a ``patch_size`` strided conv), a [CLS] token, position embeddings
    (learned, or MoCo v3's fixed 2-D sin-cos [1]), pre-norm Transformer blocks with GELU
    MLPs. Position embeddings are interpolated (bicubic) for other grid sizes, so the
    smaller local crops of DINO/SwAV multi-crop go through the same network.

    - [0] Dosovitskiy et al., An Image is Worth 16x16 Words, 2020, https://arxiv.org/abs/2010.11929
    - [1] Chen, Xie, He, An Empirical Study of Training Self-Supervised Vision
      Transformers, 2021, https://arxiv.org/abs/2104.02057 (Sec. 4, "position embedding")
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        in_channels: int = 3,
        pos_embed: str = "learned",
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"vit: image_size {image_size} is not a multiple of patch_size {patch_size}")
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"vit: pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
        self.patch_size, self.grid, self.out_dim = patch_size, image_size // patch_size, dim
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        n = self.grid * self.grid
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", _sincos_2d(self.grid, dim))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6 if pos_embed == "sincos" else 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def _pos(self, gh: int, gw: int) -> torch.Tensor:
        if gh == gw == self.grid:
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (N, D, gh, gw)
        gh, gw = x.shape[-2:]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = self.blocks(x + self._pos(gh, gw))
        return self.norm(x[:, 0])


def _sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(1, 1 + grid^2, dim) fixed 2-D sin-cos position embeddings, zero for [CLS]."""
    if dim % 4:
        raise ValueError(f"vit: sin-cos position embeddings need dim % 4 == 0, got {dim}")
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_x, out_y = xs.flatten()[:, None] * omega, ys.flatten()[:, None] * omega
    pe = torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), pe])[None]


_VIT_SIZES = {"vit_tiny": (192, 3), "vit_small": (384, 6)}  # (width, heads), DeiT's Tiny/Small, 12 blocks


def _vit(name: str) -> Callable[..., tuple[nn.Module, int]]:
    dim, heads = _VIT_SIZES[name]

    def build(
        in_channels: int = 3,
        image_size: int = 32,
        patch_size: int = 4,
        depth: int = 12,
        pos_embed: str = "learned",
        **_: object,
    ) -> tuple[nn.Module, int]:
        m = VisionTransformer(
            image_size=image_size,
            patch_size=patch_size,
            dim=dim,
            depth=depth,
            heads=heads,
            in_channels=in_channels,
            pos_embed=pos_embed,
        )
        return m, dim

    return build


for _name in _VIT_SIZES:
    BACKBONES[_name] = _vit(_name)


def build_backbone(name: str, **kwargs: object) -> tuple[nn.Module, int]:
    """Build a backbone by name: ``small_cnn``, ``resnet18``, ``resnet50``, ``vit_tiny``,
    ``vit_small``. Keyword arguments a backbone does not use are ignored.

    Args:
        name: registry key.
        in_channels: channels of the input images (all).
        cifar_stem: ResNets: 3x3 stride-1 first conv and no max-pool (small images).
        width: small_cnn: channels of the first block.
        out_width: small_cnn: channels of the last block (default 4 x ``width``).
        image_size, patch_size, depth, pos_embed: ViTs (``depth`` 12 by default).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](**kwargs)

"""Patch grids and the autoregressive context networks of CPC [0, 1].

An image is cut into a grid of overlapping square patches; every patch is encoded on its
own into a vector z[i, j] (row i, column j). A context network then summarises, for each
position, only the grid rows at or above it, so that its output c[i, j] can be asked to
predict rows further down.

- [0] Hénaff et al., Data-Efficient Image Recognition with Contrastive Predictive Coding
  (CPC v2), 2019, https://arxiv.org/abs/1905.09272 (App. A: pseudo-code of the PixelCNN-style
  context network)
- [1] van den Oord, Li, Vinyals. Representation Learning with Contrastive Predictive
  Coding, 2018, https://arxiv.org/abs/1807.03748 (vision experiments)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_patch(image_size: int, patch_size: int | None, stride: int | None) -> tuple[int, int]:
    """Patch side and stride for an image side: CPC's proportions (64 px patches every
    32 px on 256 px images [1]) when not given: side // 4 and half of that."""
    p = patch_size if patch_size is not None else max(1, image_size // 4)
    s = stride if stride is not None else max(1, p // 2)
    if p > image_size:
        raise ValueError(f"patch_size {p} is larger than the image ({image_size} px)")
    return p, s


def grid_shape(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int]:
    """Rows and columns of the patch grid; pixels past the last full patch are dropped."""
    return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


def extract_patches(x: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, R, Q, C, P, P): patch [n, i, j] is
    ``x[n, :, i*stride : i*stride + P, j*stride : j*stride + P]``."""
    if x.dim() != 4:
        raise ValueError(f"extract_patches: expected (N, C, H, W), got {tuple(x.shape)}")
    if patch_size > min(x.shape[-2:]):
        raise ValueError(f"extract_patches: patch_size {patch_size} exceeds the image ({tuple(x.shape[-2:])})")
    p = x.unfold(2, patch_size, stride).unfold(3, patch_size, stride)  # (N, C, R, Q, P, P)
    return p.permute(0, 2, 3, 1, 4, 5)


def encode_patches(backbone: nn.Module, x: torch.Tensor, patch_size: int | None, stride: int | None) -> torch.Tensor:
    """Encode every patch of every image in one backbone pass: (N, C, H, W) -> (N, R, Q, F)."""
    p, s = default_patch(min(x.shape[-2:]), patch_size, stride)
    patches = extract_patches(x, p, s)
    n, r, q = patches.shape[:3]
    z = backbone(patches.reshape(n * r * q, *patches.shape[3:]))
    return z.reshape(n, r, q, -1)


class PatchGridEncoder(nn.Module):
    """Images -> mean over the patch grid of the patch encoder's features, (N, F): the
    image representation of CPC v2's linear evaluation [0] (a spatially pooled grid)."""

    def __init__(self, backbone: nn.Module, patch_size: int | None = None, stride: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_size, self.stride = patch_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return encode_patches(self.backbone, x, self.patch_size, self.stride).mean(dim=(1, 2))


def batchnorm_to_layernorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` (in place) by a layer norm over
    (C, H, W) with per-channel scale and shift (``GroupNorm`` with one group), as CPC v2
    does [0]: batch statistics would couple the patches of an image and let the model
    see past the context's receptive field. Returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features, eps=child.eps, affine=child.affine))
        else:
            batchnorm_to_layernorm(child)
    return module


class _MaskedResidualBlock(nn.Module):
    """1x1 conv -> ReLU -> (1 x 3) conv along the row -> pad one row on top -> (2 x 1)
    conv over the row above and the current row -> ReLU -> 1x1 conv: output row i
    depends on input rows i - 1 and i only."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden, 1)
        self.row = nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1))
        self.down = nn.Conv2d(hidden, hidden, (2, 1))
        self.expand = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.row(F.relu(self.reduce(x)))
        h = F.relu(self.down(F.pad(h, (0, 0, 1, 0))))  # pad one row on top: nothing below row i reaches row i
        return self.expand(h)


class MaskedConvContext(nn.Module):
    """CPC v2's PixelCNN-style context network [0, App. A]: ``layers`` residual blocks
    of 1x1 conv -> ReLU -> (1 x 3) conv along the row -> a (2 x 1) conv over the row
    above and the current row (the grid is padded by one row on top, so nothing below
    leaks in) -> ReLU -> 1x1 conv back to ``dim``; a final ReLU. The output c[i, j]
    depends on z[u, v] for u <= i only (all columns of those rows).

    Input and output (N, dim, R, Q).
    """

    def __init__(self, dim: int, hidden: int = 256, layers: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_MaskedResidualBlock(dim, hidden) for _ in range(layers))
        self.out_dim = dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = z
        for block in self.blocks:
            c = c + block(c)
        return F.relu(c)


class GRUContext(nn.Module):
    """A GRU run down each column of the grid (top to bottom, weights shared by the
    columns). Its input at row i of column j is z[i, j] concatenated with the mean of
    row i, so c[i, j] summarises z[i, j]'s column and every full row at or above row i;
    nothing below row i reaches it.

    Input (N, dim, R, Q), output (N, hidden, R, Q). Runs in float32 (outside autocast).
    """

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.gru = nn.GRU(2 * dim, hidden, batch_first=True)
        self.out_dim = hidden

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n, d, r, q = z.shape
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            inp = torch.cat([z, z.mean(dim=3, keepdim=True).expand(-1, -1, -1, q)], dim=1)  # (N, 2D, R, Q)
            seq = inp.permute(0, 3, 2, 1).reshape(n * q, r, 2 * d)  # one sequence per column, rows in order
            out, _ = self.gru(seq)  # (NQ, R, H)
        return out.reshape(n, q, r, -1).permute(0, 3, 2, 1)

"""Colour-space conversion for CMC's luminance/chrominance views [0].

``rgb_to_lab`` is the exact CIE conversion sRGB -> linear RGB -> XYZ -> L*a*b* with the
D65 white point, written with element-wise torch operations only (so bf16 autocast never
touches it); it is not meant to be differentiated (its input is data). ``scale_lab``
maps L*a*b* to roughly [-1, 1] per channel the way CMC's code normalises its Lab images:
each channel's range over the sRGB gamut is mapped linearly onto [-1, 1].

- [0] Tian, Krishnan, Isola. Contrastive Multiview Coding, 2019,
  https://arxiv.org/abs/1906.05849 (L and ab views of ImageNet images)
- sRGB transfer function and primaries: IEC 61966-2-1; XYZ -> Lab: CIE 15 (CIELAB 1976).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cl_core.augment import IMAGENET_MEAN, IMAGENET_STD

# linear sRGB -> XYZ (D65), rows X, Y, Z
SRGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
D65_WHITE = (0.95047, 1.0, 1.08883)  # XYZ of the reference white, Y = 1
_EPS = (6.0 / 29.0) ** 3  # below it CIELAB's cube root is replaced by a line
_KAPPA = 1.0 / (3.0 * (6.0 / 29.0) ** 2)

# (min, max) of L*, a*, b* over the sRGB gamut: L in [0, 100] (black, white); a* from
# green (0, 255, 0) to magenta (255, 0, 255); b* from blue (0, 0, 255) to yellow (255, 255, 0)
LAB_RANGE = ((0.0, 100.0), (-86.183, 98.233), (-107.857, 94.478))


def srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    """Undo the sRGB transfer curve of values in [0, 1]."""
    return torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).clamp_min(0).pow(2.4))


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) sRGB in [0, 1] (clamped) -> (N, 3, H, W) float32 L*a*b*
    (L in [0, 100], a*/b* roughly in [-110, 100])."""
    if rgb.dim() != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb_to_lab: expected (N, 3, H, W), got {tuple(rgb.shape)}")
    lin = srgb_to_linear(rgb.float().clamp(0.0, 1.0))
    r, g, b = lin[:, 0], lin[:, 1], lin[:, 2]

    def f(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t > _EPS, t.clamp_min(_EPS).pow(1.0 / 3.0), t * _KAPPA + 4.0 / 29.0)

    fx, fy, fz = (f((m[0] * r + m[1] * g + m[2] * b) / w) for m, w in zip(SRGB_TO_XYZ, D65_WHITE, strict=True))
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def scale_lab(lab: torch.Tensor) -> torch.Tensor:
    """Map each L*a*b* channel's sRGB-gamut range onto [-1, 1] (CMC's normalisation)."""
    lo = torch.tensor([r[0] for r in LAB_RANGE], dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    hi = torch.tensor([r[1] for r in LAB_RANGE], dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    return (lab - (hi + lo) / 2) / ((hi - lo) / 2)


class NormalizedRGBToLab(nn.Module):
    """Images normalised with ``mean``/``std`` (the data stream's ImageNet statistics) ->
    scaled L*a*b* (:func:`scale_lab`), float32. Values outside [0, 1] after undoing the
    normalisation are clamped."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        # constants, not state: kept out of state_dict but moved with the module
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale_lab(rgb_to_lab(x.float() * self.std + self.mean))

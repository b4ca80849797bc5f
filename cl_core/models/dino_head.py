"""DINO's projection head [0]: a 3-layer GELU MLP to a bottleneck, L2 normalisation, and
a weight-normalised linear layer to K output dimensions.

- [0] Caron et al., Emerging Properties in Self-Supervised Vision Transformers, 2021,
  https://arxiv.org/abs/2104.14294 (Sec. 3.1, "Network architecture")
- [1] Salimans, Kingma, Weight Normalization, 2016, https://arxiv.org/abs/1602.07868
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cl_core.models.heads import MLP


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation [1]: ``W = g * v / ||v||`` per
    output row. With ``fixed_norm`` the scale ``g`` is the constant 1 (DINO's
    ``norm_last_layer``: every output row is a unit vector) and only the direction
    ``v`` is a parameter; otherwise ``g`` is a learned (out_features,) parameter that
    starts at 1.
    """

    def __init__(self, in_features: int, out_features: int, fixed_norm: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default initialisation
        self.weight_g = None if fixed_norm else nn.Parameter(torch.ones(out_features))

    def weight(self) -> torch.Tensor:
        w = F.normalize(self.weight_v, dim=1)
        return w if self.weight_g is None else w * self.weight_g[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fixed_norm={self.weight_g is None}"


class DINOHead(nn.Module):
    """``last_layer(normalize(mlp(h)))`` with ``mlp = MLP([in, hidden, hidden, bottleneck],
    norm=False, activation="gelu")`` (Linear weights truncated-normal, std 0.02, biases
    zero, as in DINO's code) and ``last_layer`` a :class:`WeightNormLinear` to
    ``out_dim``, computed in float32 (autocast off) whatever the MLP ran in."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = MLP([in_dim, hidden_dim, hidden_dim, bottleneck_dim], norm=False, activation="gelu")
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)
        self.out_dim = out_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(h).float(), dim=-1)
        # the logits in float32 even under bf16 autocast: after the teacher's temperature
        # (0.04) bf16's 8-bit mantissa moves them by tenths
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.last_layer(z)

"""Momentum (EMA) encoders: a frozen copy of a module moved by an exponential moving
average of the online weights (MoCo [0], BYOL [1], DINO [2]).

- [0] He et al., Momentum Contrast for Unsupervised Visual Representation Learning,
  2020, https://arxiv.org/abs/1911.05722 (Eq. 2: theta_k <- m theta_k + (1 - m) theta_q)
- [1] Grill et al., Bootstrap Your Own Latent, 2020, https://arxiv.org/abs/2006.07733
  (Sec. 3.2: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2)
- [2] Caron et al., Emerging Properties in Self-Supervised Vision Transformers, 2021,
  https://arxiv.org/abs/2104.14294
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parameter frozen (``requires_grad=False``):
    the optimizer never sees it; only :func:`ema_update` moves it."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target <- m * target + (1 - m) * online`` for every parameter. Buffers (BN
    running statistics) are the target's own, updated by its own forward passes, as in
    MoCo's and BYOL's code."""
    t_params: list[torch.Tensor] = list(target.parameters())
    o_params: list[torch.Tensor] = list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError(f"ema_update: target has {len(t_params)} parameters, online {len(o_params)}")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in o_params], alpha=1.0 - momentum)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``, rising
    from ``base`` at step 0 to 1 at ``total_steps``."""
    t = min(1.0, max(0.0, step / max(1, total_steps)))
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0

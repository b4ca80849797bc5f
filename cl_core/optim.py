"""Optimizers (SGD, AdamW, LARS), the learning-rate schedule and batch-size scaling."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling [0], as used by SimCLR [1].

    For each parameter w with gradient g (plus weight decay wd*w), the step is scaled by
    the trust ratio ``eta * ||w|| / ||g + wd*w||``. Parameter groups with
    ``lars_exclude=True`` (norms and biases in SimCLR) get neither the adaptation nor
    weight decay. The momentum buffer accumulates the trust-scaled gradient and the
    current learning rate multiplies the buffer (``v = m v + trust * g; w -= lr * v``,
    the LARS of the Barlow Twins and VICReg code). SimCLR's TensorFlow LARS puts the
    learning rate inside the buffer (``v = m v + lr * trust * g; w -= v``); the two agree
    at a constant learning rate and differ slightly while it changes (warm-up, decay).

    - [0] You, Gitman, Ginsburg, Large Batch Training of Convolutional Networks, 2017,
      https://arxiv.org/abs/1708.03888
    - [1] Chen et al., 2020, https://arxiv.org/abs/2002.05709 (appendix B.1)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 0.001,
    ) -> None:
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if eta <= 0:
            raise ValueError(f"LARS: eta must be > 0, got {eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            exclude = group["lars_exclude"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not exclude:
                    if group["weight_decay"] > 0:
                        g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    g = g * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def scale_lr(lr_base: float, global_batch_size: int, rule: str = "linear") -> float:
    """Peak learning rate from ``lr_base`` (defined per 256 images).

    ``linear``: lr_base * B / 256 (Goyal et al. 2017); ``sqrt``: lr_base * sqrt(B / 256)
    (SimCLR's 0.075 * sqrt(B) is lr_base = 1.2); ``none``: lr_base.
    """
    if rule == "linear":
        return lr_base * global_batch_size / 256
    if rule == "sqrt":
        return lr_base * math.sqrt(global_batch_size / 256)
    if rule == "none":
        return lr_base
    raise ValueError(f"unknown lr scaling rule {rule!r}; known: linear, sqrt, none")


def lr_at(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to ``peak_lr`` over ``warmup_steps``, then cosine decay to
    ``final_lr`` at ``total_steps``. A pure function of the step."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + 0.5 * (peak_lr - final_lr) * (1 + math.cos(math.pi * t))


def build_optimizer(
    name: str, param_groups: list[dict], lr: float, *, weight_decay: float, momentum: float = 0.9
) -> Optimizer:
    """SGD (Nesterov-free, momentum), AdamW or LARS over ``param_groups`` (see
    :meth:`cl_core.methods.Method.param_groups`, which already sets per-group decay)."""
    groups = [dict(g) for g in param_groups]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for g in groups:
        g.pop("lars_exclude", None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: sgd, adamw, lars")


def set_lr(optimizer: Optimizer, lr: float, peak_lr: float | None = None) -> None:
    """Set the scheduled ``lr`` on every group; groups marked ``fixed_lr`` (SimSiam's
    predictor) keep ``peak_lr`` throughout."""
    for g in optimizer.param_groups:
        g["lr"] = peak_lr if g.get("fixed_lr") and peak_lr is not None else lr

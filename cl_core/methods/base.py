"""The small surface every method implements, and the method registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Register a method class under ``name`` (the file stem by convention)."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = cls
        cls.name = name
        return cls

    return deco


def known_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
    return METHODS[name]


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """A self-supervised method: a backbone plus whatever heads, losses and state it needs.

    ``forward(views)`` is the training step's forward pass (so DDP can wrap the whole
    method) and returns a :class:`StepOutput`.
    """

    name: str = ""
    uses_labels: bool = False  # True: forward(views, labels, aux) (supervised objectives)
    backbone: nn.Module
    feat_dim: int

    def forward(self, views: list[torch.Tensor]) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def encoder(self) -> nn.Module:
        """The module whose features downstream stages use."""
        return self.backbone

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two groups: weights with decay; norms and biases without decay and
        excluded from LARS adaptation (``lars_exclude``), as in SimCLR."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for p in self.parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
        ]

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Hook for EMA updates, queues, prototype normalisation. Nothing by default."""

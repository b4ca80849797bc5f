"""The small surface every method implements, and the method registry.

A method is an ``nn.Module`` whose ``forward`` is the whole training step's forward pass
(so DDP can wrap it) and returns a :class:`StepOutput`. Everything a method keeps
between steps (EMA weights, queues, memory banks, centers, prototypes) lives in its
parameters and buffers, so ``state_dict`` holds it and a resumed run continues exactly.

Constructor convention (what the pipeline and the tests rely on)::

    Method(backbone: str = "small_cnn", *, backbone_args: dict | None = None,
           gather_distributed: bool = True, <hyperparameters with paper defaults>)

The hyperparameters after ``gather_distributed`` are what ``pretrain.params.<method>``
sets from YAML and what a sweep may vary (:func:`method_params`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from cl_core.errors import HyperparameterError

METHODS: dict[str, type[Method]] = {}

# the constructor arguments the pipeline fills in itself (num_samples: the training split's size, for
# methods with a memory bank); the rest are hyperparameters
STRUCTURAL_ARGS = ("self", "backbone", "backbone_args", "gather_distributed", "num_samples")

ViewKind = Literal["two_views", "multi_crop", "single", "text"]


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


def build_method(record: Mapping[str, Any], *, gather_distributed: bool = True) -> Method:
    """The method a record describes: ``{"method": NAME, "kwargs": {...}}`` (a checkpoint's,
    an Encoder's or a saved model's ``model`` record)."""
    return get_method(record["method"])(**record.get("kwargs", {}), gather_distributed=gather_distributed)


def method_params(name: str) -> dict[str, Any]:
    """The hyperparameters of method ``name`` and their defaults (keyword arguments of
    its constructor other than the structural ones)."""
    sig = inspect.signature(get_method(name).__init__)
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in sig.parameters.values()
        if p.name not in STRUCTURAL_ARGS and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


# ---- argument checks shared by the methods (one-line errors naming the parameter) -------


def check_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise HyperparameterError(name, f"must be a finite number > 0, got {value!r}")
    return float(value)


def check_momentum(name: str, value: float) -> float:
    """An EMA momentum: in [0, 1)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise HyperparameterError(name, f"must be in [0, 1), got {value!r}")
    return float(value)


def check_int(name: str, value: int, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise HyperparameterError(name, f"must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """A self-supervised method: a backbone plus whatever heads, losses and state it needs.

    Class attributes the training loop and the pipeline read:

    - ``view_kind``: which views the data stream makes: ``two_views`` (two augmented
      views), ``multi_crop`` (2 global views, then N smaller local views), ``single``
      (one augmented view; the method derives its own views, e.g. CMC's channel split,
      CPC's patch grid), ``text`` (token ids, SimCSE).
    - ``uses_labels``: ``forward(views, labels, aux)`` (supervised objectives, SupCon).
    - ``needs_index``: ``forward(views, index=...)`` with each sample's dense index in
      the training split (memory banks).
    - ``loop_defaults``: the method's own defaults for the loop's general options that
      a config leaves unset (``grad_clip``, ``weight_decay_end``; see
      :class:`cl_core.engine.LoopConfig`), e.g. DINO's gradient clipping.
    - ``sweep_space``: the hyperparameters a sweep varies when its config names no space
      (``sweep.space`` unset), each with the grid to try, e.g. SimCLR's temperatures;
      a name is one of the method's hyperparameters or a training field (``lr_base``).
    - ``global_bn``: whether the authors' code normalises with the batch statistics of
      all workers together (``SyncBatchNorm`` / cross-replica BN) when it trains on
      several; ``pretrain.sync_bn: auto`` follows it (:mod:`cl_core.models.global_bn`).

    Hooks the loop calls, in order, for each step: :meth:`set_progress` (schedules),
    ``forward``, backward, :meth:`before_optimizer_step` (gradient surgery such as
    frozen prototypes), optimizer step, :meth:`after_optimizer_step` (EMA updates).
    Schedules must be pure functions of the step so that resuming restores them.
    """

    name: str = ""
    view_kind: ViewKind = "two_views"
    uses_labels: bool = False
    needs_index: bool = False
    loop_defaults: ClassVar[dict[str, float]] = {}
    global_bn: ClassVar[bool] = False
    sweep_space: ClassVar[dict[str, list[Any]]] = {}
    backbone: nn.Module
    feat_dim: int

    def forward(self, views: list[torch.Tensor]) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def encoder(self) -> nn.Module:
        """The module whose features downstream stages use (images -> (N, feat_dim))."""
        return self.backbone

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two groups: weights with decay; norms and biases without decay and
        excluded from LARS adaptation (``lars_exclude``), as in SimCLR.
        Parameters without ``requires_grad`` (EMA targets, frozen layers) are left out."""
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

    def momentum_targets(self) -> list[nn.Module]:
        """Modules moved only by an EMA of other weights (never by the optimizer)."""
        return []

    def compile_targets(self) -> list[nn.Module]:
        """The networks worth ``torch.compile`` (``compile: true``): the encoder and its
        momentum copies, where the step's convolutions and attention run."""
        return [self.encoder(), *self.momentum_targets()]

    # ---- hooks -------------------------------------------------------------------
    def set_progress(self, step: int, total_steps: int) -> None:
        """Called before each forward with the optimizer steps done and the total."""
        self.progress_step, self.progress_total = step, max(1, total_steps)

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        """After backward, before the optimizer step (e.g. cancel frozen gradients)."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """After the optimizer step (EMA updates). Nothing by default."""

    # ---- smoke-test support ------------------------------------------------------
    @classmethod
    def smoke_kwargs(cls) -> dict[str, Any]:
        """Constructor arguments for a tiny instance (tests, CPU bench): small dims,
        queues and banks. The backbone is small_cnn of width 4 unless overridden."""
        return {"backbone": "small_cnn", "backbone_args": {"width": 4}}

    @classmethod
    def example_batch(
        cls, n: int = 4, image_size: int = 16, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Keyword arguments of ``forward`` for a random batch of ``n`` samples, following
        ``view_kind``/``uses_labels``/``needs_index``."""
        g = generator

        def img(s: int) -> torch.Tensor:
            return torch.randn(n, 3, s, s, generator=g)

        if cls.view_kind == "two_views":
            views = [img(image_size), img(image_size)]
        elif cls.view_kind == "multi_crop":
            local = max(4, image_size // 2)
            views = [img(image_size), img(image_size), img(local), img(local)]
        elif cls.view_kind == "single":
            views = [img(image_size)]
        else:
            raise NotImplementedError(f"{cls.__name__}: view_kind {cls.view_kind!r} needs its own example_batch")
        out: dict[str, Any] = {"views": views}
        if cls.uses_labels:
            out["labels"] = torch.arange(n) % 2
            out["aux"] = None
        if cls.needs_index:
            out["index"] = torch.arange(n)
        return out

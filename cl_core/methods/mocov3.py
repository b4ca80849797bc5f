"""MoCo v3: momentum contrast without a queue, with a prediction head and a symmetrised
loss, for ResNets and Vision Transformers [0].

Query encoder f_q = predictor(projector(backbone)); momentum encoder f_k = EMA copy of
projector(backbone) (the predictor has no momentum counterpart). The negatives of a
query are the momentum keys of the other images of the batch, gathered from all workers
(no queue). For ViTs the random patch projection is frozen ([0] Sec. 4.2), which the
paper found to stabilise training.

- [0] Chen, Xie, He. An Empirical Study of Training Self-Supervised Vision Transformers.
  ICCV 2021. https://arxiv.org/abs/2104.02057
- [1] He et al., Momentum Contrast for Unsupervised Visual Representation Learning,
  2019, https://arxiv.org/abs/1911.05722
- [2] Grill et al., Bootstrap Your Own Latent, 2020, https://arxiv.org/abs/2006.07733
  (prediction head; the cosine momentum schedule)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from cl_core.losses.infonce import gathered_infonce
from cl_core.methods.base import (
    Method,
    StepOutput,
    check_int,
    check_momentum,
    check_positive,
    register,
)
from cl_core.methods.moco import check_momentum_schedule, scheduled_momentum
from cl_core.models import build_backbone
from cl_core.models.backbones import VisionTransformer
from cl_core.models.heads import MLP
from cl_core.models.momentum import ema_update, momentum_copy


@register("mocov3")
class MoCoV3(Method):
    """MoCo v3: ``loss = ctr(q1, k2) + ctr(q2, k1)`` ([0] Algorithm 1).

    ``ctr(q, k)`` is the InfoNCE of each local query against the keys of all workers
    (the positive, key of the other view of the same image, on the rank-offset
    diagonal), multiplied by ``2 T`` as in [0] Algorithm 1 (which makes the gradient's
    scale less sensitive to T). q = f_q(x) and k = f_k(x) are computed view by view (BN
    statistics per view, as in the released code); keys get no gradient.

    Heads ([0] Sec. 5, "MLP heads"): hidden layers of width ``hidden_dim`` with BN and
    ReLU, ``proj_dim`` outputs, no Linear biases, the projector's output BN without
    affine parameters. The projector has 3 layers for ViTs and 2 for ResNets and other
    CNNs; the predictor has 2 and ends with that BN for ViTs only: the released ResNet
    builder's predictor ends with a plain (bias-free) Linear.

    Args:
        backbone: name for :func:`cl_core.models.build_backbone` (``resnet*``, ``vit_tiny``,
            ``vit_small``, ``small_cnn``); ``backbone_args`` its keyword arguments.
        gather_distributed: keys (negatives) from all workers.
        temperature: T; None takes the paper's default for the backbone: 0.2 for a ViT,
            1.0 otherwise.
        momentum: base EMA momentum m of the momentum encoder.
        momentum_schedule: ``cosine`` (m rises to 1 over training) or ``constant``.
        hidden_dim: hidden width of projector and predictor.
        proj_dim: output width of projector and predictor.
        proj_layers: projector depth; None: 3 for a ViT, 2 otherwise.
        freeze_patch_embed: ViTs only: keep the randomly initialised patch projection
            fixed (no gradient, not in the optimizer); ignored for other backbones, which
            have no patch projection.
    """

    # the sweep's default space (sweep.space unset): MoCo v3's EMA momentum (0.99 default, cosine to 1)
    sweep_space: ClassVar[dict[str, list[Any]]] = {"momentum": [0.9, 0.99, 0.996]}

    global_bn = True  # main_moco.py: convert_sync_batchnorm

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        backbone_args: dict | None = None,
        gather_distributed: bool = True,
        temperature: float | None = None,  # None: [0] Sec. 5 "Loss": 0.2 (ViT); 1.0 for ResNet-50 ([0] App. A)
        momentum: float = 0.99,  # [0] App. A and released recipes: m = 0.99
        momentum_schedule: str = "cosine",  # [0] (BYOL's [2] schedule): m increases to 1 with a half cosine
        hidden_dim: int = 4096,  # [0] Sec. 5, "MLP heads": 4096-d hidden layers
        proj_dim: int = 256,  # [0] Sec. 5, "MLP heads": 256-d outputs
        proj_layers: int | None = None,  # [0] Sec. 5: 3-layer projector (ViT); 2 for ResNet (released code)
        freeze_patch_embed: bool = True,  # [0] Sec. 4.2: random (frozen) patch projection
    ) -> None:
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(backbone, **(backbone_args or {}))
        self.is_vit = isinstance(self.backbone, VisionTransformer)
        default_t = 0.2 if self.is_vit else 1.0
        self.temperature = default_t if temperature is None else check_positive("temperature", temperature)
        self.momentum = check_momentum("momentum", momentum)
        self.momentum_schedule = check_momentum_schedule(momentum_schedule)
        self.gather_distributed = gather_distributed
        hidden_dim = check_int("hidden_dim", hidden_dim)
        proj_dim = check_int("proj_dim", proj_dim)
        layers = (3 if self.is_vit else 2) if proj_layers is None else check_int("proj_layers", proj_layers, minimum=1)
        self.freeze_patch_embed = bool(freeze_patch_embed) and self.is_vit

        if self.freeze_patch_embed and isinstance(self.backbone, VisionTransformer):
            for p in self.backbone.patch_embed.parameters():
                p.requires_grad_(False)
        self.projector = MLP(
            [self.feat_dim] + [hidden_dim] * (layers - 1) + [proj_dim], last_norm=True, last_norm_affine=False
        )
        self.predictor = MLP([proj_dim, hidden_dim, proj_dim], last_norm=self.is_vit, last_norm_affine=False)
        if not self.is_vit:  # the released ResNet predictor: _build_mlp(..., last_bn=False), every Linear bias-free
            self.predictor[-1] = nn.Linear(hidden_dim, proj_dim, bias=False)
        self.key_backbone = momentum_copy(self.backbone)
        self.key_projector = momentum_copy(self.projector)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_projector(self.key_backbone(x))

    def contrast(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ctr(q, k)`` of [0] Algorithm 1 (scaled by 2T) and the positive's top-1 rate."""
        out = gathered_infonce(q, k, self.temperature, gather_distributed=self.gather_distributed)
        return 2 * self.temperature * out.loss, out.top1

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x1, x2 = views[0], views[1]  # (N, C, H, W) each
        q1, q2 = self._query(x1), self._query(x2)  # (N, D)
        k1, k2 = self._key(x1), self._key(x2)  # (N, D), no gradient
        l12, top1_12 = self.contrast(q1, k2)
        l21, top1_21 = self.contrast(q2, k1)
        loss = l12 + l21
        return StepOutput(loss=loss, metrics={"train/loss": loss.detach(), "train/pos_top1": (top1_12 + top1_21) / 2})

    # ---- momentum encoder ------------------------------------------------------------
    def momentum_at(self, step: int, total_steps: int) -> float:
        return scheduled_momentum(self.momentum, self.momentum_schedule, step, total_steps)

    def momentum_targets(self) -> list[nn.Module]:
        return [self.key_backbone, self.key_projector]

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        m = self.momentum_at(step, total_steps)
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_projector, self.projector, m)

    @classmethod
    def smoke_kwargs(cls) -> dict:
        return {**super().smoke_kwargs(), "hidden_dim": 16, "proj_dim": 8}

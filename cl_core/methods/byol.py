"""BYOL: an online network predicts a slowly moving target network's projection of
another view [0].

- [0] Grill et al., Bootstrap Your Own Latent: A New Approach to Self-Supervised
  Learning, 2020, https://arxiv.org/abs/2006.07733

Online: backbone f, projector g, predictor q. Target: an EMA copy of f and g (weights
xi <- tau xi + (1 - tau) theta after every optimizer step, Sec. 3.1), with tau rising
from ``tau_base`` to 1 on a cosine schedule over training (Sec. 3.3). The loss (Sec. 3.1)
is the normalised MSE ``2 - 2 cos(q(z), sg(z'))`` of view 0's prediction against view 1's
target projection plus the same with the views swapped. The loss is per sample, so
nothing is gathered across workers (``gather_distributed`` is accepted for the common
constructor and has no effect).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from cl_core.losses.byol import byol_loss
from cl_core.methods.base import Method, StepOutput, check_int, check_momentum, register
from cl_core.models import build_backbone
from cl_core.models.heads import MLP
from cl_core.models.momentum import cosine_momentum, ema_update, momentum_copy


@register("byol")
class BYOL(Method):
    """Online backbone + projector ``MLP([F, 4096, 256])`` + predictor
    ``MLP([256, 4096, 256])``; target = EMA copy of backbone + projector.

    Each view goes through the networks in its own pass, so batch-norm statistics are
    per view as in the official implementation. The target runs in training mode (batch
    statistics) under ``no_grad``.

    Args:
        backbone: name for :func:`cl_core.models.build_backbone`; ``backbone_args`` its
            keyword arguments.
        gather_distributed: unused (the loss is per sample).
        proj_hidden_dim: hidden width of the projector and of the predictor.
        proj_dim: output width of the projector and of the predictor.
        tau_base: EMA momentum at step 0; it rises to 1 at the last step.

    Metrics: ``train/loss``, ``train/cos_sim`` (mean cosine between prediction and
    target over both directions), ``train/tau`` (this step's EMA momentum).
    """

    # the sweep's default space (sweep.space unset): BYOL's target decay ablation (Table 5b)
    sweep_space: ClassVar[dict[str, list[Any]]] = {"tau_base": [0.9, 0.99, 0.996]}

    global_bn = True  # BYOL appendix: batch statistics over all devices (cross-replica BN)

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        backbone_args: dict | None = None,
        gather_distributed: bool = True,
        proj_hidden_dim: int = 4096,  # BYOL [0] Sec. 3.3: projector and predictor hidden width 4096
        proj_dim: int = 256,  # BYOL [0] Sec. 3.3: projection (and prediction) dim 256
        tau_base: float = 0.996,  # BYOL [0] Sec. 3.3: tau_base = 0.996, raised to 1 with a cosine
    ) -> None:
        super().__init__()
        check_int("proj_hidden_dim", proj_hidden_dim)
        check_int("proj_dim", proj_dim)
        self.tau_base = check_momentum("tau_base", tau_base)
        self.gather_distributed = gather_distributed
        self.backbone, self.feat_dim = build_backbone(backbone, **(backbone_args or {}))
        self.projector = MLP([self.feat_dim, proj_hidden_dim, proj_dim])
        self.predictor = MLP([proj_dim, proj_hidden_dim, proj_dim])
        # the target starts as an exact copy of the online backbone and projector (Sec. 3.3)
        self.target_backbone = momentum_copy(self.backbone)
        self.target_projector = momentum_copy(self.projector)
        self.progress_step, self.progress_total = 0, 1

    def tau(self, step: int, total_steps: int) -> float:
        """The EMA momentum of step ``step`` of ``total_steps`` (Sec. 3.3)."""
        return cosine_momentum(self.tau_base, step, total_steps)

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x0, x1 = views  # (N, C, H, W) each
        p0 = self.predictor(self.projector(self.backbone(x0)))  # (N, D)
        p1 = self.predictor(self.projector(self.backbone(x1)))
        with torch.no_grad():
            t0 = self.target_projector(self.target_backbone(x0))  # (N, D)
            t1 = self.target_projector(self.target_backbone(x1))
        loss = byol_loss(p0, p1, t0, t1)
        tau = self.tau(self.progress_step, self.progress_total)
        metrics = {
            "train/loss": loss.detach(),
            "train/cos_sim": 1.0 - loss.detach() / 4.0,  # loss = mean of (2 - 2cos) + (2 - 2cos)
            "train/tau": loss.new_tensor(tau).detach(),
        }
        return StepOutput(loss=loss, metrics=metrics)

    def momentum_targets(self) -> list[torch.nn.Module]:
        return [self.target_backbone, self.target_projector]

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        tau = self.tau(step, total_steps)
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)

    @classmethod
    def smoke_kwargs(cls) -> dict:
        return {**super().smoke_kwargs(), "proj_hidden_dim": 32, "proj_dim": 16}

"""Barlow Twins: make the cross-correlation matrix of two views' embeddings close to the
identity (redundancy reduction) [0].

- [0] Zbontar, Jing, Misra, LeCun, Deny. Barlow Twins: Self-Supervised Learning via
  Redundancy Reduction. ICML 2021. https://arxiv.org/abs/2103.03230

The batch statistics and the cross-correlation are those of the global batch (the
embeddings are gathered from all workers with gradients); see
:mod:`cl_core.losses.barlow_twins` for the loss and how its scaling relates to the
official code.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from cl_core.losses.barlow_twins import BarlowTwinsLoss
from cl_core.methods.base import Method, StepOutput, check_int, register
from cl_core.models import build_backbone
from cl_core.models.heads import MLP


@register("barlow_twins")
class BarlowTwins(Method):
    """Backbone + projector ``MLP([F, 8192, 8192, 8192])`` (batch norm and ReLU after the
    two hidden layers, a plain linear output), loss of Eq. 1 on the projections.

    The output linear layer has no bias, as in the official code: the loss standardises
    every dimension along the batch, which cancels any bias. Each view goes through the
    network in its own pass (batch-norm statistics per view, as in the official code).

    Args:
        backbone: name for :func:`cl_core.models.build_backbone`; ``backbone_args`` its
            keyword arguments.
        gather_distributed: statistics and cross-correlation over all workers.
        lambd: weight of the redundancy-reduction (off-diagonal) term.
        proj_hidden_dim: width of the projector's two hidden layers.
        proj_dim: embedding width (the size of the cross-correlation matrix).

    Metrics: ``train/loss``, ``train/on_diag`` (sum (1 - C_ii)^2), ``train/off_diag``
    (sum_{i != j} C_ij^2, unweighted), ``train/c_diag_mean`` (mean C_ii).
    """

    # the sweep's default space (sweep.space unset): the off-diagonal weight around Barlow Twins' 0.0051
    sweep_space: ClassVar[dict[str, list[Any]]] = {"lambd": [0.0025, 0.0051, 0.01]}

    global_bn = True  # main.py: convert_sync_batchnorm

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        backbone_args: dict | None = None,
        gather_distributed: bool = True,
        lambd: float = 0.0051,  # Barlow Twins [0] Sec. 2 (implementation details: ~5e-3); official code 0.0051
        proj_hidden_dim: int = 8192,  # Barlow Twins [0] Sec. 2: three linear layers of 8192 units
        proj_dim: int = 8192,  # Barlow Twins [0] Sec. 2: 8192 output units
    ) -> None:
        super().__init__()
        check_int("proj_hidden_dim", proj_hidden_dim)
        check_int("proj_dim", proj_dim)
        self.criterion = BarlowTwinsLoss(lambd, gather_distributed=gather_distributed)  # validates lambd
        self.backbone, self.feat_dim = build_backbone(backbone, **(backbone_args or {}))
        self.projector = MLP([self.feat_dim, proj_hidden_dim, proj_hidden_dim, proj_dim])
        self.projector[-1] = nn.Linear(proj_hidden_dim, proj_dim, bias=False)

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x0, x1 = views  # (N, C, H, W) each
        z0 = self.projector(self.backbone(x0))  # (N, D)
        z1 = self.projector(self.backbone(x1))
        terms = self.criterion(z0, z1)
        metrics = {
            "train/loss": terms.loss.detach(),
            "train/on_diag": terms.on_diag.detach(),
            "train/off_diag": terms.off_diag.detach(),
            "train/c_diag_mean": terms.diag_mean,
        }
        return StepOutput(loss=terms.loss, metrics=metrics)

    @classmethod
    def smoke_kwargs(cls) -> dict:
        return {**super().smoke_kwargs(), "proj_hidden_dim": 32, "proj_dim": 32}

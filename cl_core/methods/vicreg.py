"""VICReg: variance, invariance and covariance regularisation of two views'
embeddings [0].

- [0] Bardes, Ponce, LeCun. VICReg: Variance-Invariance-Covariance Regularization for
  Self-Supervised Learning. ICLR 2022. https://arxiv.org/abs/2105.04906

The variance and covariance terms are computed over the global batch (embeddings
gathered from all workers with gradients); see :mod:`cl_core.losses.vicreg` for the
loss (the official code's: the variance term is the mean over the two views, where the
paper's Eq. 6 writes their sum).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from cl_core.losses.vicreg import VICRegLoss
from cl_core.methods.base import Method, StepOutput, check_int, register
from cl_core.models import build_backbone
from cl_core.models.heads import MLP


@register("vicreg")
class VICReg(Method):
    """Backbone + expander ``MLP([F, 8192, 8192, 8192])`` (batch norm and ReLU after the
    two hidden layers, a bias-free linear output as in the official code), the official
    code's loss on the embeddings (:mod:`cl_core.losses.vicreg`).

    Each view goes through the network in its own pass (batch-norm statistics per view,
    as in the official code).

    Args:
        backbone: name for :func:`cl_core.models.build_backbone`; ``backbone_args`` its
            keyword arguments.
        gather_distributed: variance and covariance over all workers.
        invariance_weight: lambda; variance_weight: mu; covariance_weight: nu.
        gamma: target standard deviation per dimension; eps: added under the square root.
        proj_hidden_dim: width of the expander's two hidden layers.
        proj_dim: embedding width.

    Metrics: ``train/loss`` and the unweighted terms ``train/invariance`` (MSE),
    ``train/variance`` ((v(Z) + v(Z')) / 2), ``train/covariance`` (c(Z) + c(Z')).
    """

    # the sweep's default space (sweep.space unset): the invariance weight around VICReg's 25
    sweep_space: ClassVar[dict[str, list[Any]]] = {"invariance_weight": [10.0, 25.0, 50.0]}

    global_bn = True  # main_vicreg.py: convert_sync_batchnorm

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        backbone_args: dict | None = None,
        gather_distributed: bool = True,
        invariance_weight: float = 25.0,  # VICReg [0] Sec. 4 (implementation details), lambda in Eq. 6
        variance_weight: float = 25.0,  # VICReg [0] Sec. 4, mu in Eq. 6
        covariance_weight: float = 1.0,  # VICReg [0] Sec. 4, nu in Eq. 6
        gamma: float = 1.0,  # VICReg [0] Sec. 3.1 (Eq. 1): gamma fixed to 1
        eps: float = 1e-4,  # VICReg [0] Sec. 4, epsilon in Eq. 1
        proj_hidden_dim: int = 8192,  # VICReg [0] Sec. 4: expander of three 8192-unit layers
        proj_dim: int = 8192,  # VICReg [0] Sec. 4: embedding dim 8192
    ) -> None:
        super().__init__()
        check_int("proj_hidden_dim", proj_hidden_dim)
        check_int("proj_dim", proj_dim)
        self.criterion = VICRegLoss(
            invariance_weight,
            variance_weight,
            covariance_weight,
            gamma=gamma,
            eps=eps,
            gather_distributed=gather_distributed,
        )  # validates the weights, gamma, eps
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
            "train/invariance": terms.invariance.detach(),
            "train/variance": terms.variance.detach(),
            "train/covariance": terms.covariance.detach(),
        }
        return StepOutput(loss=terms.loss, metrics=metrics)

    @classmethod
    def smoke_kwargs(cls) -> dict:
        return {**super().smoke_kwargs(), "proj_hidden_dim": 32, "proj_dim": 32}

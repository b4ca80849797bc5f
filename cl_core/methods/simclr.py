"""SimCLR: contrastive learning with in-batch negatives [0], with SimCLRv2's deeper head [1].

- [0] Chen et al., A Simple Framework for Contrastive Learning of Visual Representations,
  2020, https://arxiv.org/abs/2002.05709
- [1] Chen et al., Big Self-Supervised Models are Strong Semi-Supervised Learners, 2020,
  https://arxiv.org/abs/2006.10029
"""

from __future__ import annotations

import torch

from cl_core.losses import NTXentLoss
from cl_core.methods.base import Method, StepOutput, register
from cl_core.models import SimCLRProjectionHead, build_backbone


@register("simclr")
class SimCLR(Method):
    """Encoder f, projection head g, NT-Xent on z = g(f(x)) of two views.

    Args:
        backbone: name for :func:`cl_core.models.build_backbone`.
        temperature: NT-Xent temperature (SimCLR: 0.1 at batch 4096; 0.5 on CIFAR-10).
        head_layers: 2 (SimCLR) or 3 (SimCLRv2).
        head_hidden_dim: hidden width of the head; None keeps the feature width.
        proj_dim: output dim of the head (128 in both papers).
        gather_distributed: negatives from all workers.
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        temperature: float = 0.5,
        head_layers: int = 2,
        head_hidden_dim: int | None = None,
        proj_dim: int = 128,
        in_channels: int = 3,
        cifar_stem: bool = False,
        width: int = 32,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(backbone, in_channels=in_channels, cifar_stem=cifar_stem, width=width)
        self.head = SimCLRProjectionHead(self.feat_dim, head_hidden_dim or self.feat_dim, proj_dim, head_layers)
        self.criterion = NTXentLoss(temperature, gather_distributed=gather_distributed)

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x0, x1 = views  # (N, C, H, W) each
        n = x0.shape[0]
        # one backbone pass over both views: the same BN statistics for both, as in SimCLR
        h = self.backbone(torch.cat([x0, x1]))  # (2N, F)
        z = self.head(h)  # (2N, D)
        loss = self.criterion(z[:n], z[n:])
        return StepOutput(loss=loss, metrics={"train/loss": loss.detach()})

"""SimCLR: contrastive learning with in-batch negatives [0], with SimCLRv2's deeper head [1].

- [0] Chen et al., A Simple Framework for Contrastive Learning of Visual Representations,
  2020, https://arxiv.org/abs/2002.05709
- [1] Chen et al., Big Self-Supervised Models are Strong Semi-Supervised Learners, 2020,
  https://arxiv.org/abs/2006.10029
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from cl_core.errors import HyperparameterError
from cl_core.losses import NTXentLoss
from cl_core.methods.base import Method, StepOutput, check_positive, register
from cl_core.models import SimCLRProjectionHead, build_backbone


@register("simclr")
class SimCLR(Method):
    """Encoder f, projection head g, NT-Xent on z = g(f(x)) of two views.

    Args:
        backbone: name for :func:`cl_core.models.build_backbone`; ``backbone_args`` its
            keyword arguments.
        gather_distributed: negatives from all workers.
        temperature: NT-Xent temperature.
        head_layers: 2 (SimCLR) or 3 (SimCLRv2).
        head_hidden_dim: hidden width of the head; None keeps the feature width.
        proj_dim: output dim of the head.
    """

    # the sweep's default space (sweep.space unset): SimCLR's Table 5 range
    sweep_space: ClassVar[dict[str, list[Any]]] = {"temperature": [0.1, 0.2, 0.5, 1.0]}

    global_bn = True  # SimCLR section 2.2 (global BN): cross-replica BN in the TF code

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        backbone_args: dict | None = None,
        gather_distributed: bool = True,
        temperature: float = 0.5,  # SimCLR [0] B.9: 0.5 for CIFAR-10 (0.1 at batch 4096 on ImageNet)
        head_layers: int = 2,  # SimCLR [0]: 2; SimCLRv2 [1]: 3, fine-tuned from the first; 1 linear, 0 none (ablations)
        head_hidden_dim: int | None = None,  # SimCLR [0]: the feature width (2048 for ResNet-50)
        proj_dim: int = 128,  # SimCLR [0] and SimCLRv2 [1]: 128
    ) -> None:
        super().__init__()
        if head_layers not in (0, 1, 2, 3, 4):
            raise HyperparameterError(
                "head_layers", f"must be 2, 3 or 4 (1: a linear head, 0: none), got {head_layers!r}"
            )
        self.backbone, self.feat_dim = build_backbone(backbone, **(backbone_args or {}))
        self.head = SimCLRProjectionHead(self.feat_dim, head_hidden_dim or self.feat_dim, proj_dim, head_layers)
        self.criterion = NTXentLoss(check_positive("temperature", temperature), gather_distributed=gather_distributed)

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x0, x1 = views  # (N, C, H, W) each
        n = x0.shape[0]
        # one backbone pass over both views: the same BN statistics for both, as in SimCLR
        h = self.backbone(torch.cat([x0, x1]))  # (2N, F)
        z = self.head(h)  # (2N, D)
        loss = self.criterion(z[:n], z[n:])
        return StepOutput(loss=loss, metrics={"train/loss": loss.detach()})

    @classmethod
    def smoke_kwargs(cls) -> dict:
        return {**super().smoke_kwargs(), "proj_dim": 8}

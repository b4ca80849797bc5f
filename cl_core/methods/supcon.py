"""SupCon: supervised contrastive pretraining [0].

The positives of an anchor are all samples of its class in the batch, not only the
other view of the same image; the encoder is then used with a classifier trained on
top of it (see :class:`cl_core.downstream.supcon_finetune.SupConObjective` for a stage that
trains both in one pass).

- [0] Khosla et al., Supervised Contrastive Learning, NeurIPS 2020,
  https://arxiv.org/abs/2004.11362
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cl_core.losses.supcon import SupConLoss
from cl_core.methods.base import Method, StepOutput, check_int, check_positive, register
from cl_core.models import build_backbone
from cl_core.models.heads import MLP


def check_labeled(labels: torch.Tensor | None, n: int) -> torch.Tensor:
    """The batch's labels, or a clear error when they are missing or hold -1 (unlabeled)."""
    if labels is None:
        raise ValueError("supcon: the batch has no labels; a supervised contrastive stage needs labeled shards")
    if labels.shape != (n,):
        raise ValueError(f"supcon: expected {n} labels, got shape {tuple(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(
            "supcon: the batch holds unlabeled samples (label -1); supervised contrastive "
            "pretraining needs shards where every sample has a class"
        )
    return labels


@register("supcon")
class SupCon(Method):
    """Encoder f, projection head g (2-layer MLP, no batch norm), SupCon's L_out on the
    normalised z = g(f(x)) of two views, with positives from the labels.

    Args:
        backbone: name for :func:`cl_core.models.build_backbone`; ``backbone_args`` its
            keyword arguments.
        gather_distributed: keys and labels from all workers.
        temperature: SupCon temperature T.
        base_temperature: None: Eq. 2 as written; a number b scales the loss by T / b (the
            authors' code uses b = 0.07).
        head_hidden_dim: hidden width of the head; None keeps the feature width.
        proj_dim: output dim of the head.
    """

    # the sweep's default space (sweep.space unset): around SupCon's 0.1
    sweep_space: ClassVar[dict[str, list[Any]]] = {"temperature": [0.05, 0.1, 0.2]}

    uses_labels = True

    global_bn = True  # the TF SupCon code trains with SimCLR's cross-replica BN

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        backbone_args: dict | None = None,
        gather_distributed: bool = True,
        temperature: float = 0.1,  # SupCon [0] Sec. 4 and Appendix: 0.1 works best
        base_temperature: float | None = None,  # SupCon [0] Eq. 2 has no scaling (its code: 0.07)
        head_hidden_dim: int | None = None,  # SupCon [0] Sec. 3.1: 2048 = ResNet-50's feature width
        proj_dim: int = 128,  # SupCon [0] Sec. 3.1: 128-d normalised output
    ) -> None:
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(backbone, **(backbone_args or {}))
        hidden = self.feat_dim if head_hidden_dim is None else check_int("head_hidden_dim", head_hidden_dim)
        self.head = MLP([self.feat_dim, hidden, check_int("proj_dim", proj_dim)], norm=False)
        if base_temperature is not None:
            check_positive("base_temperature", base_temperature)
        self.criterion = SupConLoss(
            check_positive("temperature", temperature), base_temperature, gather_distributed=gather_distributed
        )

    def forward(
        self,
        views: list[torch.Tensor],
        labels: torch.Tensor | None = None,  # type: ignore[override]
        aux: tuple[list[torch.Tensor], torch.Tensor] | None = None,
    ) -> StepOutput:
        """``views``: two (N, C, H, W) views; ``labels``: (N,) classes; ``aux`` is unused."""
        x0, x1 = views
        n = x0.shape[0]
        labels = check_labeled(labels, n)
        # one backbone pass over both views: the same BN statistics for both
        z = self.head(self.backbone(torch.cat([x0, x1]))).float()  # (2N, D)
        loss = self.criterion([z[:n], z[n:]], labels)
        with torch.no_grad():
            z_std = F.normalize(z, dim=1).std(dim=0).mean()  # near 0 when the embeddings collapse
        return StepOutput(loss=loss, metrics={"train/loss": loss.detach(), "train/z_std": z_std})

    @classmethod
    def smoke_kwargs(cls) -> dict:
        return {**super().smoke_kwargs(), "proj_dim": 8}

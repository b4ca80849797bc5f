"""SimSiam: a Siamese network with a predictor and stop-gradient, no negatives and no
momentum encoder [0].

- [0] Chen and He, Exploring Simple Siamese Representation Learning, 2020,
  https://arxiv.org/abs/2011.10566

Encoder f = backbone + 3-layer projection MLP, predictor h; the loss is
``D(p1, sg(z2))/2 + D(p2, sg(z1))/2`` with D the negative cosine (Eq. 4). The predictor
is trained at a fixed learning rate (Sec. 4.2, "Predictor": no decay for h works
better). The loss is per sample, so nothing is gathered across workers
(``gather_distributed`` is accepted for the common constructor and has no effect).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cl_core.losses.simsiam import simsiam_loss
from cl_core.methods.base import Method, StepOutput, check_int, register
from cl_core.models import build_backbone
from cl_core.models.heads import MLP


@register("simsiam")
class SimSiam(Method):
    """Backbone, projector ``MLP([F, F, F, 2048], last_norm=True, last_norm_affine=False)``
    (hidden layers as wide as the backbone's features F, as the official code builds it
    from the backbone's ``fc``: 2048 for ResNet-50, 512 for ResNet-18; batch norm on every
    layer including the output, which has no ReLU and, as in the official code, no
    learned scale or shift) and predictor
    ``MLP([2048, 512, 2048])`` (a bottleneck: batch norm and ReLU on the hidden layer,
    a plain linear output).

    Each view goes through the network in its own pass (batch-norm statistics per view,
    as in the official code).

    Args:
        backbone: name for :func:`cl_core.models.build_backbone`; ``backbone_args`` its
            keyword arguments.
        gather_distributed: unused (the loss is per sample).
        proj_dim: width of the projector's output layer (d).
        proj_hidden_dim: width of its two hidden layers; None: the backbone's feature
            width (the official code; the paper's "2048-d" hidden layers are ResNet-50's).
        pred_hidden_dim: the predictor's bottleneck width.

    Metrics: ``train/loss``; ``train/z_std``, the per-dimension standard deviation over
    the batch of the l2-normalised projection z of view 0, averaged over dimensions
    (Fig. 2: about 0 when collapsed, about 1/sqrt(d) for well-spread outputs).
    """

    # the sweep's default space (sweep.space unset): no temperature or EMA: the learning rate, from SimSiam's 0.05 up
    sweep_space: ClassVar[dict[str, list[Any]]] = {"lr_base": [0.05, 0.2, 1.0]}

    global_bn = True  # main_simsiam.py: convert_sync_batchnorm

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        backbone_args: dict | None = None,
        gather_distributed: bool = True,
        proj_dim: int = 2048,  # SimSiam [0] Sec. 3 (projection MLP): output fc 2048-d
        proj_hidden_dim: int | None = None,  # the official builder: the backbone's width (2048-d for ResNet-50)
        pred_hidden_dim: int = 512,  # SimSiam [0] Sec. 3 (prediction MLP): hidden layer 512-d
    ) -> None:
        super().__init__()
        check_int("proj_dim", proj_dim)
        if proj_hidden_dim is not None:
            check_int("proj_hidden_dim", proj_hidden_dim)
        check_int("pred_hidden_dim", pred_hidden_dim)
        self.gather_distributed = gather_distributed
        self.backbone, self.feat_dim = build_backbone(backbone, **(backbone_args or {}))
        hidden = proj_hidden_dim or self.feat_dim
        self.projector = MLP([self.feat_dim, hidden, hidden, proj_dim], last_norm=True, last_norm_affine=False)
        self.predictor = MLP([proj_dim, pred_hidden_dim, proj_dim])

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        x0, x1 = views  # (N, C, H, W) each
        z0 = self.projector(self.backbone(x0))  # (N, d)
        z1 = self.projector(self.backbone(x1))
        p0, p1 = self.predictor(z0), self.predictor(z1)  # (N, d)
        loss = simsiam_loss(p0, p1, z0, z1)
        with torch.no_grad():
            z_std = F.normalize(z0.float(), dim=1).std(dim=0).mean()
        return StepOutput(loss=loss, metrics={"train/loss": loss.detach(), "train/z_std": z_std})

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The base class's decay / no-decay split, each split again into the encoder's
        parameters and the predictor's; the predictor's groups carry ``fixed_lr`` (the
        training loop keeps them at the peak learning rate)."""
        predictor = {id(p) for p in self.predictor.parameters()}
        groups = []
        for fixed in (False, True):
            for g in super().param_groups(weight_decay):
                params = [p for p in g["params"] if (id(p) in predictor) == fixed]
                groups.append({**g, "params": params, "fixed_lr": fixed})
        return groups

    @classmethod
    def smoke_kwargs(cls) -> dict:
        return {**super().smoke_kwargs(), "proj_dim": 32, "pred_hidden_dim": 8}

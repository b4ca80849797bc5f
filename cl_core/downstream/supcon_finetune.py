"""A supervised-contrastive objective for the labeled stages: SupCon [0] on a classifier's
features with a cross-entropy linear layer trained alongside, so one pass over the
labeled images yields a usable classifier.

SupCon trains the encoder with its contrastive loss and fits the linear classifier
afterwards on frozen features [0]; here the classifier's ``fc`` sees detached features,
so it cannot steer the encoder and fitting it concurrently is that second stage run in
the same pass.

- [0] Khosla et al., Supervised Contrastive Learning, NeurIPS 2020,
  https://arxiv.org/abs/2004.11362 (Sec. 3 and 4)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_core.downstream.classifier import Classifier
from cl_core.losses.supcon import SupConLoss
from cl_core.methods.base import Method, StepOutput, check_int, check_positive
from cl_core.methods.supcon import check_labeled
from cl_core.models.heads import MLP


class SupConObjective(Method):
    """SupCon on ``head(classifier.features(x))`` of two views of each labeled image, plus
    cross-entropy of ``classifier.fc`` on the detached features of both views.

    loss = supcon + ce. ``features`` (backbone and neck) get gradients only from SupCon,
    the head only from SupCon, ``fc`` only from the cross-entropy. Not a registered
    pretraining method: the labeled stages build it around their classifier.

    Args:
        classifier: the model being trained (its backbone may be shared with a pretrained
            method, as :func:`cl_core.downstream.classifier_from_pretrained` does).
        head: projection head on ``classifier.features`` output (e.g. a pretrained
            SupCon method's ``head``); None builds ``MLP([F, F, proj_dim], norm=False)``.
        temperature: SupCon temperature.
        base_temperature: None, or the base of the T / base scaling (see
            :class:`~cl_core.losses.supcon.SupConLoss`).
        proj_dim: output dim of a new head (unused when ``head`` is given).
        gather_distributed: SupCon keys and labels from all workers.
    """

    uses_labels = True

    def __init__(
        self,
        classifier: Classifier,
        head: nn.Module | None = None,
        *,
        temperature: float = 0.1,
        base_temperature: float | None = None,
        proj_dim: int = 128,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.feat_dim = classifier.feat_dim
        if head is None:
            head = MLP([classifier.feat_dim, classifier.feat_dim, check_int("proj_dim", proj_dim)], norm=False)
        self.head = head
        if base_temperature is not None:
            check_positive("base_temperature", base_temperature)
        self.criterion = SupConLoss(
            check_positive("temperature", temperature), base_temperature, gather_distributed=gather_distributed
        )

    def encoder(self) -> nn.Module:
        return self.classifier.backbone

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
        h = self.classifier.features(torch.cat([x0, x1]))  # (2N, F), one pass: shared BN statistics
        z = self.head(h).float()
        supcon = self.criterion([z[:n], z[n:]], labels)
        logits = self.classifier.fc(h.detach()).float()  # the linear layer cannot move the features
        both = torch.cat([labels, labels])
        ce = F.cross_entropy(logits, both)
        loss = supcon + ce
        top1 = (logits.argmax(1) == both).float().mean()
        return StepOutput(
            loss=loss,
            metrics={
                "train/loss": loss.detach(),
                "train/supcon": supcon.detach(),
                "train/ce": ce.detach(),
                "train/top1": top1.detach(),
            },
        )

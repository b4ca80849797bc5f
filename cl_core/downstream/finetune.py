"""Supervised objectives on labeled images: fine-tuning a pretrained classifier (the
SimCLRv2 teacher) and training the same architecture from scratch (the baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_core.downstream.classifier import Classifier
from cl_core.methods.base import Method, StepOutput


class SupervisedObjective(Method):
    """Cross-entropy of ``classifier`` on one augmented view of each labeled image.

    A :class:`~cl_core.methods.base.Method` so that the pretraining loop (optimizer,
    schedule, checkpoints, DDP) trains it unchanged; ``uses_labels`` makes the loop pass
    the batch's labels.
    """

    uses_labels = True

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.feat_dim = classifier.feat_dim

    def encoder(self) -> nn.Module:
        return self.classifier.backbone

    def forward(
        self,
        views: list[torch.Tensor],
        labels: torch.Tensor | None = None,  # type: ignore[override]
        aux: tuple[list[torch.Tensor], torch.Tensor] | None = None,
    ) -> StepOutput:
        (x,) = views
        if labels is None or labels.min() < 0:
            raise ValueError("a supervised batch holds unlabeled samples (label -1); the labeled shards are wrong")
        logits = self.classifier(x)
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(1) == labels).float().mean()
        return StepOutput(loss=loss, metrics={"train/loss": loss.detach(), "train/top1": acc.detach()})

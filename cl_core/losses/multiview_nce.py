"""Cross-view InfoNCE of Contrastive Multiview Coding [0] (the softmax-CE form of its
contrastive loss), with in-batch negatives or with memory-bank negatives.

- [0] Tian, Krishnan, Isola. Contrastive Multiview Coding, 2019,
  https://arxiv.org/abs/1906.05849 (L_contrast^{V1,V2} and its symmetric sum;
  memory-bank negatives; the full graph over more than two views)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_core import distributed


class CrossViewInfoNCE(nn.Module):
    """One direction of CMC's loss with in-batch negatives: anchors from view a, keys
    from view b.

    For N local pairs (a_i, b_i) of L2-normalised embeddings, anchor a_i's positive is
    b_i and its negatives are the other b_j of the batch (of every worker with
    ``gather_distributed``: keys gathered with gradient, labels offset by rank). The
    loss is the mean over the local anchors of ``-log softmax_j(a_i . b_j / T)[i]``.
    CMC's two-view loss is ``loss(a, b) + loss(b, a)``.

    Returns ``(loss, accuracy)``, accuracy the fraction of anchors whose positive scores
    highest (detached).
    """

    def __init__(self, temperature: float = 0.07, gather_distributed: bool = True) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if a.shape != b.shape or a.dim() != 2:
            raise ValueError(
                f"CrossViewInfoNCE: expected two (N, D) tensors of equal shape, got {tuple(a.shape)} "
                f"and {tuple(b.shape)}"
            )
        a, b = a.float(), b.float()
        n = a.shape[0]
        keys, rank = (distributed.gather(b), distributed.rank()) if self.gather_distributed else (b, 0)
        if keys.shape[0] < 2:
            raise ValueError("CrossViewInfoNCE: needs at least 2 samples in the (global) batch to have a negative")
        labels = torch.arange(n, device=a.device) + rank * n
        with torch.autocast(a.device.type, enabled=False):  # float32 scores even under bf16 autocast
            logits = a @ keys.T / self.temperature  # (N, WN)
            loss = F.cross_entropy(logits, labels)
        return loss, (logits.detach().argmax(dim=1) == labels).float().mean()


def bank_infonce(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction of CMC's loss with memory-bank negatives.

    ``anchors`` (N, D) from view a (with gradient); ``positives`` (N, D) the bank entries of
    view b for the same samples; ``negatives`` (N, m, D) bank entries of view b drawn at
    random (detached). The loss is the mean of ``-log softmax([a.p, a.n_1..a.n_m] / T)[0]``.
    Returns ``(loss, accuracy)`` as :class:`CrossViewInfoNCE`.
    """
    a = anchors.float()
    labels = torch.zeros(a.shape[0], dtype=torch.long, device=a.device)
    with torch.autocast(a.device.type, enabled=False):  # float32 scores even under bf16 autocast
        pos = (a * positives.float()).sum(dim=1, keepdim=True)  # (N, 1)
        neg = torch.bmm(negatives.float(), a.unsqueeze(2)).squeeze(2)  # (N, m)
        logits = torch.cat([pos, neg], dim=1) / temperature
        loss = F.cross_entropy(logits, labels)
    return loss, (logits.detach().argmax(dim=1) == 0).float().mean()

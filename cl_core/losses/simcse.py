"""The InfoNCE objective of SimCSE [0] (Eq. 1) with in-batch negatives.

- [0] Gao, Yao, Chen. SimCSE: Simple Contrastive Learning of Sentence Embeddings. EMNLP
  2021. https://arxiv.org/abs/2104.08821 (Sec. 2, Eq. 1; Sec. 3)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cl_core import distributed


class SimCSELoss(nn.Module):
    """SimCSE's Eq. 1 over a batch of N pairs (h_i, h_i^+):

    ``l_i = -log( exp(sim(h_i, h_i^+)/T) / sum_j exp(sim(h_i, h_j^+)/T) )``

    with cosine similarity ``sim``; j runs over the second embeddings of the batch, so
    each anchor has N-1 negatives h_j^+ (j != i) and the positive sits in the
    denominator too. Unlike NT-Xent the loss is one-directional (the anchors are the
    first embeddings only) and no anchor is compared with another first embedding.
    With ``gather_distributed`` on W workers the second embeddings are gathered from
    every worker (autograd-correct), giving WN - 1 negatives; the positive of local
    anchor i is column ``rank * N + i``. The loss is the mean over the local anchors,
    so the mean over workers (DDP's gradient averaging) is the loss of the global
    batch.

    Args:
        temperature: T > 0 (SimCSE: 0.05).
        gather_distributed: negatives from all workers when a process group is
            initialised; without one the loss is the single-process loss.
    """

    def __init__(self, temperature: float = 0.05, gather_distributed: bool = True) -> None:
        super().__init__()
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"SimCSELoss: temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def logits(self, h: torch.Tensor, h_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine similarities / T of the local anchors against every positive (N, WN),
        the column of each anchor's own positive (N,))."""
        if h.shape != h_pos.shape or h.dim() != 2:
            raise ValueError(
                f"SimCSELoss: expected two (N, D) tensors of equal shape, got {tuple(h.shape)} and {tuple(h_pos.shape)}"
            )
        n = h.shape[0]
        a = F.normalize(h.float(), dim=1)
        k = F.normalize(h_pos.float(), dim=1)
        r = 0
        if self.gather_distributed:
            k, r = distributed.gather(k), distributed.rank()  # (WN, D)
        if k.shape[0] < 2:
            raise ValueError("SimCSELoss: needs at least 2 sentences in the (global) batch to have a negative")
        target = torch.arange(n, device=h.device) + r * n
        return a @ k.T / self.temperature, target  # one matmul

    def forward(self, h: torch.Tensor, h_pos: torch.Tensor) -> torch.Tensor:
        logits, target = self.logits(h, h_pos)
        return F.cross_entropy(logits, target)

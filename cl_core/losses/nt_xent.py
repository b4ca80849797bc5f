"""NT-Xent: the normalized temperature-scaled cross entropy of SimCLR [0].

- [0] Chen, Kornblith, Norouzi, Hinton. A Simple Framework for Contrastive Learning of
  Visual Representations. ICML 2020. https://arxiv.org/abs/2002.05709 (Eq. 1)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cl_core import distributed


class NTXentLoss(nn.Module):
    """NT-Xent over both directions of a batch of positive pairs.

    For N local pairs (z0_i, z1_i) there are 2N anchors. Each anchor's positive is the
    other view of the same image; its negatives are all other 2N-2 samples of the
    batch (2WN-2 with ``gather_distributed`` on W workers: local anchors are compared
    against the keys gathered from every worker, and the labels are offset by rank).
    The loss is the mean over the local anchors of
    ``-log(exp(sim(z_i, z_j)/T) / sum_{k != i} exp(sim(z_i, z_k)/T))`` with cosine
    similarity ``sim``.

    Scale, compared with SimCLR's TensorFlow code: that code adds the two directions'
    batch means (``loss_a + loss_b``), twice this mean over the 2N anchors. Gradients are
    therefore half the official ones, and the official recipe corresponds to:

    - SGD (momentum, coupled weight decay): ``lr_base`` twice the official one and
      ``weight_decay`` half of it give exactly the official steps;
    - LARS: the same ``lr_base`` and half the official ``weight_decay`` give exactly the
      official steps of every adapted weight (the trust ratio cancels the factor); the
      excluded biases and BatchNorm parameters (no adaptation) step half as far as in
      the official code.

    ``tests/cl_core/test_nt_xent.py`` checks the factor and both equivalences step by step.

    Args:
        temperature: T > 0. SimCLR used 0.1 at large batch, 0.5 for CIFAR-10.
        gather_distributed: gather negatives from all workers when a process group is
            initialised; without one the loss is the single-process loss.
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = True) -> None:
        super().__init__()
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"NTXentLoss: temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        if z0.shape != z1.shape or z0.dim() != 2:
            raise ValueError(
                f"NTXentLoss: expected two (N, D) tensors of equal shape, got {tuple(z0.shape)} and {tuple(z1.shape)}"
            )
        with torch.autocast(z0.device.type, enabled=False):  # float32 logits even under bf16 autocast
            return self._loss(z0.float(), z1.float())

    def _loss(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        n = z0.shape[0]
        z0 = F.normalize(z0, dim=1)
        z1 = F.normalize(z1, dim=1)
        if self.gather_distributed:
            k0, k1 = distributed.gather(z0), distributed.gather(z1)  # (WN, D)
            r = distributed.rank()
        else:
            k0, k1, r = z0, z1, 0
        wn = k0.shape[0]
        if 2 * wn < 3:
            raise ValueError("NTXentLoss: needs at least 2 pairs in the (global) batch to have a negative")
        anchors = torch.cat([z0, z1])  # (2N, D)
        keys = torch.cat([k0, k1])  # (2WN, D)
        logits = anchors @ keys.T / self.temperature  # (2N, 2WN), one matmul
        local = torch.arange(n, device=z0.device) + r * n  # this rank's rows within k0 / k1
        self_idx = torch.cat([local, local + wn])  # each anchor's own column
        pos_idx = torch.cat([local + wn, local])  # the other view of the same image
        rows = torch.arange(2 * n, device=z0.device)
        logits = logits.index_put((rows, self_idx), torch.tensor(float("-inf"), device=z0.device))
        return F.cross_entropy(logits, pos_idx)

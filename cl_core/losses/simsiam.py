"""SimSiam's symmetrised negative cosine similarity with stop-gradient [0] (Eq. 1-4).

- [0] Chen and He, Exploring Simple Siamese Representation Learning, 2020,
  https://arxiv.org/abs/2011.10566

``D(p, z) = -cos(p, sg(z))`` and ``L = D(p1, z2)/2 + D(p2, z1)/2``. The loss is per
sample, so nothing is gathered across workers: DDP's gradient averaging over equal
per-worker batches gives the gradient of the mean over the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``D(p, z)``: the batch mean of ``-cos(p_i, z_i)`` with ``z`` detached (Eq. 3), in
    float32. In [-1, 1]."""
    if p.shape != z.shape or p.dim() != 2:
        raise ValueError(
            f"negative_cosine: expected two (N, D) tensors of equal shape, got {tuple(p.shape)} and {tuple(z.shape)}"
        )
    return -(F.normalize(p.float(), dim=1) * F.normalize(z.detach().float(), dim=1)).sum(dim=1).mean()


def simsiam_loss(p0: torch.Tensor, p1: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """``D(p0, z1)/2 + D(p1, z0)/2`` (Eq. 4) for predictions ``p`` and projections ``z``
    of views 0 and 1. Gradients reach the encoder only through the predictions."""
    with torch.autocast(device_type=p0.device.type, enabled=False):
        return 0.5 * negative_cosine(p0, z1) + 0.5 * negative_cosine(p1, z0)

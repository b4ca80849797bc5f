"""BYOL's regression loss: the mean squared error between l2-normalised prediction and
target projection, ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)`` [0] (Sec. 3.1, Eq. 2),
symmetrised over the two views (Sec. 3.1: L + L~, each view predicting the other).

- [0] Grill et al., Bootstrap Your Own Latent: A New Approach to Self-Supervised
  Learning, 2020, https://arxiv.org/abs/2006.07733

The loss is per sample: nothing is gathered across workers. With equal per-worker
batches, DDP's averaging of the parameter gradients already gives the gradient of the
mean loss over the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ``2 - 2 cos(p_i, z_i)`` (equal to ``||p_i/|p_i| - z_i/|z_i|||^2``), in
    float32; (N, D), (N, D) -> (N,). Gradients flow into both arguments: detach the
    target yourself (:func:`byol_loss` does)."""
    if p.shape != z.shape or p.dim() != 2:
        raise ValueError(
            f"normalized_mse: expected two (N, D) tensors of equal shape, got {tuple(p.shape)} and {tuple(z.shape)}"
        )
    cos = (F.normalize(p.float(), dim=1) * F.normalize(z.float(), dim=1)).sum(dim=1)
    return 2.0 - 2.0 * cos


def byol_loss(p0: torch.Tensor, p1: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    """BYOL's symmetrised loss for online predictions ``p0, p1`` of views 0 and 1 and
    target projections ``t0, t1`` of the same views: view 0's prediction regresses view
    1's target and vice versa. The targets are detached (stop-gradient, Sec. 3.1).

    Returns the batch mean of ``(2 - 2 cos(p0, t1)) + (2 - 2 cos(p1, t0))``, in [0, 8].
    """
    with torch.autocast(device_type=p0.device.type, enabled=False):
        per_sample = normalized_mse(p0, t1.detach()) + normalized_mse(p1, t0.detach())
    return per_sample.mean()

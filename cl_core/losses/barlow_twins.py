"""The Barlow Twins loss: drive the cross-correlation matrix of the two views'
embeddings to the identity [0] (Eq. 1-2).

- [0] Zbontar, Jing, Misra, LeCun, Deny. Barlow Twins: Self-Supervised Learning via
  Redundancy Reduction. ICML 2021. https://arxiv.org/abs/2103.03230

Scaling, compared with the official code: the loss here is Eq. 1 as printed,
``sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2``, with ``C`` the cross-correlation
of Eq. 2 over the global batch of N samples. Each dimension is standardised along the
batch (mean 0, biased variance 1: batch norm without affine parameters, eps 1e-5 as in
``nn.BatchNorm1d``), and then ``C = za^T zb / N`` is exactly Eq. 2 (up to that eps). The
official code computes the same matrix (synchronised batch norm, ``c / batch_size`` with
the global batch size, summed over workers) and the same two sums with no further
factor, so the values agree with it. The gradients agree on one worker only: the
official ``all_reduce`` of ``c`` passes no gradient, so each of W workers
differentiates only its own part of ``c`` and DDP's average gives 1/W of the global
loss's gradient, while this module (an autograd-correct gather) gives the global
loss's exact gradient, W times the official one. LARS's trust ratio absorbs the factor
for the adapted weights; the excluded biases and norms take W times larger steps at the
same learning rate. The first release of that code also multiplied both terms by a
constant ``scale_loss`` (1/32), another pure rescaling, not used here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from cl_core import distributed
from cl_core.errors import HyperparameterError


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each column of ``z`` (N, D) to mean 0 and (biased) variance 1 along the batch, as
    ``nn.BatchNorm1d(D, affine=False)`` does in training mode."""
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The d(d-1) off-diagonal entries of a square (d, d) matrix, as a flat view-free copy.

    In the row-major flattening the diagonal sits at positions 0, d+1, 2(d+1), ...;
    dropping the last element and reading the rest as (d-1, d+1) rows puts every
    diagonal entry in column 0, so the remaining columns are exactly the off-diagonal."""
    d = m.shape[0]
    if m.dim() != 2 or m.shape[1] != d:
        raise ValueError(f"off_diagonal: expected a square matrix, got {tuple(m.shape)}")
    return m.flatten()[:-1].reshape(d - 1, d + 1)[:, 1:].flatten()


class BarlowTwinsTerms(NamedTuple):
    loss: torch.Tensor  # on_diag + lambd * off_diag
    on_diag: torch.Tensor  # sum_i (1 - C_ii)^2, the invariance term
    off_diag: torch.Tensor  # sum_{i != j} C_ij^2, the redundancy-reduction term (unweighted)
    diag_mean: torch.Tensor  # mean of C_ii (detached; 1 when the views agree)


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins' loss over the global batch.

    With ``gather_distributed`` the embeddings of both views are gathered from every
    worker (autograd-correct :func:`cl_core.distributed.gather`), so the batch
    statistics of the standardisation and ``C`` are those of the global batch. Every
    worker then computes the same global loss; the gather's backward sums each worker's
    slice gradient over workers and DDP averages, which gives exactly the gradient of
    the global loss (2 workers x B == 1 worker x 2B). The loss runs in float32 with
    autocast off: ``C`` sums N products per entry and bf16 would blur the small
    off-diagonal values the second term penalises.

    Args:
        lambd: weight of the off-diagonal (redundancy-reduction) term, >= 0.
        eps: added to the variance in the standardisation (batch norm's eps).
        gather_distributed: statistics over all workers; without a process group the
            loss is the single-process loss.
    """

    def __init__(self, lambd: float = 0.0051, eps: float = 1e-5, gather_distributed: bool = True) -> None:
        super().__init__()
        if not isinstance(lambd, (int, float)) or isinstance(lambd, bool) or not math.isfinite(lambd) or lambd < 0:
            raise HyperparameterError("lambd", f"must be a finite number >= 0, got {lambd!r}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
            raise HyperparameterError("eps", f"must be a finite number >= 0, got {eps!r}")
        self.lambd, self.eps = float(lambd), float(eps)
        self.gather_distributed = gather_distributed

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> BarlowTwinsTerms:
        if z0.shape != z1.shape or z0.dim() != 2:
            raise ValueError(
                f"BarlowTwinsLoss: expected two (N, D) tensors of equal shape, got {tuple(z0.shape)}"
                f" and {tuple(z1.shape)}"
            )
        with torch.autocast(device_type=z0.device.type, enabled=False):
            za, zb = z0.float(), z1.float()
            if self.gather_distributed:
                za, zb = distributed.gather(za), distributed.gather(zb)  # (WN, D)
            n = za.shape[0]
            if n < 2:
                raise ValueError("BarlowTwinsLoss: needs at least 2 samples in the (global) batch for batch statistics")
            c = standardize(za, self.eps).T @ standardize(zb, self.eps) / n  # (D, D), Eq. 2
            diag = torch.diagonal(c)
            on_diag = (1.0 - diag).pow(2).sum()
            off_diag = off_diagonal(c).pow(2).sum()
            loss = on_diag + self.lambd * off_diag
        return BarlowTwinsTerms(loss, on_diag, off_diag, diag.detach().mean())

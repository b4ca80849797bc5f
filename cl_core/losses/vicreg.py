"""The VICReg loss: invariance, variance and covariance terms [0] (Sec. 3.1, Eq. 1-6).

- [0] Bardes, Ponce, LeCun. VICReg: Variance-Invariance-Covariance Regularization for
  Self-Supervised Learning. ICLR 2022. https://arxiv.org/abs/2105.04906

``L = lambda * s(Z, Z') + mu * [v(Z) + v(Z')] / 2 + nu * [c(Z) + c(Z')]`` with

- ``s``: the mean squared error between the two views' embeddings, averaged over the
  batch and the dimensions (``F.mse_loss``, as the official code; the paper's ``s``
  sums the squared distance over the dimensions, but the published coefficients go
  with the mean);
- ``v(Z) = 1/d sum_j max(0, gamma - sqrt(Var(z^j) + eps))`` (Eq. 1), unbiased variance
  along the batch;
- ``c(Z) = 1/d sum_{i != j} C(Z)_ij^2`` with ``C(Z)`` the (n - 1)-normalised covariance
  matrix.

The variance term is the *mean* of the two views' ``v``, as in the official
``main_vicreg.py`` (``mean(relu(1 - std_x)) / 2 + mean(relu(1 - std_y)) / 2``), whose
coefficients 25 / 25 / 1 were tuned with it; Eq. 6 of the paper writes the sum, which at
``mu = 25`` weighs the variance twice as much as the released models were trained with
(``variance_weight = 50`` gives Eq. 6 as printed).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cl_core import distributed
from cl_core.errors import HyperparameterError
from cl_core.losses.barlow_twins import off_diagonal


def variance_term(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """``v(Z)``: the mean over dimensions of the hinge ``max(0, gamma - sqrt(Var + eps))``
    on each dimension's (unbiased) standard deviation along the batch (Eq. 1)."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """``c(Z)``: the sum of squared off-diagonal covariances divided by the dimension d."""
    n, d = z.shape
    zc = z - z.mean(dim=0, keepdim=True)
    cov = zc.T @ zc / (n - 1)  # (d, d)
    return off_diagonal(cov).pow(2).sum() / d


class VICRegTerms(NamedTuple):
    loss: torch.Tensor  # weighted sum, Eq. 6
    invariance: torch.Tensor  # s(Z, Z') (unweighted)
    variance: torch.Tensor  # (v(Z) + v(Z')) / 2 (unweighted), the official code's std_loss
    covariance: torch.Tensor  # c(Z) + c(Z') (unweighted)


def _nonnegative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise HyperparameterError(name, f"must be a finite number >= 0, got {value!r}")
    return float(value)


class VICRegLoss(nn.Module):
    """VICReg's loss, with the variance and covariance over the global batch.

    With ``gather_distributed`` both views' embeddings are gathered from every worker
    (autograd-correct :func:`cl_core.distributed.gather`, the official code's
    ``FullGatherLayer``) for ``v`` and ``c``, which every worker then computes on the
    global batch; the gather's backward plus DDP's averaging give exactly their global
    gradient. The invariance term is a per-sample mean and stays local: the mean over
    workers of the local terms is the global term, and DDP's averaging gives its
    gradient. Runs in float32 with autocast off.

    Args:
        invariance_weight: lambda; variance_weight: mu; covariance_weight: nu (all >= 0).
        gamma: target standard deviation of each dimension (> 0).
        eps: added to the variance under the square root (> 0).
        gather_distributed: statistics over all workers; without a process group the
            loss is the single-process loss.
    """

    def __init__(
        self,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        gamma: float = 1.0,
        eps: float = 1e-4,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        self.invariance_weight = _nonnegative("invariance_weight", invariance_weight)
        self.variance_weight = _nonnegative("variance_weight", variance_weight)
        self.covariance_weight = _nonnegative("covariance_weight", covariance_weight)
        for name, value in (("gamma", gamma), ("eps", eps)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise HyperparameterError(name, f"must be a finite number > 0, got {value!r}")
        self.gamma, self.eps = float(gamma), float(eps)
        self.gather_distributed = gather_distributed

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> VICRegTerms:
        if z0.shape != z1.shape or z0.dim() != 2:
            raise ValueError(
                f"VICRegLoss: expected two (N, D) tensors of equal shape, got {tuple(z0.shape)} and {tuple(z1.shape)}"
            )
        with torch.autocast(device_type=z0.device.type, enabled=False):
            za, zb = z0.float(), z1.float()
            invariance = F.mse_loss(za, zb)  # local batch; see the class docstring
            if self.gather_distributed:
                za, zb = distributed.gather(za), distributed.gather(zb)  # (WN, D)
            if za.shape[0] < 2:
                raise ValueError("VICRegLoss: needs at least 2 samples in the (global) batch for variances")
            variance = (variance_term(za, self.gamma, self.eps) + variance_term(zb, self.gamma, self.eps)) / 2
            covariance = covariance_term(za) + covariance_term(zb)
            loss = (
                self.invariance_weight * invariance
                + self.variance_weight * variance
                + self.covariance_weight * covariance
            )
        return VICRegTerms(loss, invariance, variance, covariance)

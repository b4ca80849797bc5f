"""BatchNorm over the global batch of every worker, on any device and backend (gloo too).

SimCLR (section 2.2, "Global BN"), BYOL, SimSiam, SwAV, DINO (ResNet), Barlow Twins,
VICReg, MoCo v3 and SupCon normalise with the mean and variance of the whole batch across
devices: torch's ``SyncBatchNorm`` in the PyTorch releases, cross-replica BN in the TF/JAX
ones. With per-worker statistics, a contrastive loss over gathered negatives can tell a
positive (same worker, same statistics) from most negatives without learning anything.
torch's ``SyncBatchNorm`` refuses CPU tensors, so CPU (gloo) workers and any other device
use :class:`GlobalBatchNorm`.

Each worker reduces its batch to (count, mean, sum of squared deviations) per channel; one
all_gather shares them; the global mean and biased variance follow from Chan et al.'s
pairwise combination (no E[x^2] - E[x]^2 cancellation). The gather is differentiable
(:func:`cl_core.distributed.gather`), so each worker's gradient includes what the other
workers' losses send through the shared statistics, as in ``SyncBatchNorm``. Running
statistics are updated with the global mean and the unbiased global variance, so every
worker holds the same buffers. The statistics are computed in float32 under autocast.

Without a process group, with one worker, or in eval mode with running statistics, the
module is an ordinary BatchNorm. The parameters and buffers keep BatchNorm's names, so a
state dict saved from a converted model loads into the plain model and back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cl_core import distributed


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm1d/2d/3d whose batch statistics are those of all workers' batches together."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.synchronize = True  # switched off by :func:`local_statistics`

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"GlobalBatchNorm: expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        batch_stats = self.training or self.running_mean is None
        if not (batch_stats and self.synchronize and distributed.world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        with torch.no_grad():
            # ATen's fused per-channel statistics (several times faster than torch.var_mean
            # on a CPU); the biased variance from the inverse standard deviation
            _, mean, invstd = torch.ops.aten.native_batch_norm(xf, None, None, None, None, True, 0.0, self.eps)
            var = (invstd.pow(-2) - self.eps).clamp_(min=0)
            n = torch.tensor([x.numel() // c], dtype=torch.float32, device=x.device)
            stats = distributed.gather_nograd(torch.cat([n, mean, var * n]).unsqueeze(0))  # (W, 1 + 2C)
            counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + c], stats[:, 1 + c :]
            total = counts.sum()
            g_mean = (counts * means).sum(0) / total
            g_m2 = (m2s + counts * (means - g_mean) ** 2).sum(0)
            g_var = g_m2 / total  # biased, as BatchNorm normalises
            if self.training and self.track_running_stats and self.running_mean is not None:
                assert self.num_batches_tracked is not None and self.running_var is not None
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = g_m2 / (total - 1).clamp(min=1)
                self.running_mean.mul_(1 - m).add_(g_mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        weight = self.weight.float() if self.affine else torch.ones(c, device=x.device)
        bias = self.bias.float() if self.affine else torch.zeros(c, device=x.device)
        # the count stays a tensor: a float() of it would be a graph break in compiled networks
        y = _GlobalNormalize.apply(xf, weight, bias, g_mean, g_var, self.eps, total)
        return y.to(x.dtype)


class _GlobalNormalize(torch.autograd.Function):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with the global batch's ``mean``
    and ``var``, and the gradient that flows through them: the backward all-reduces each
    channel's sum of ``dy`` and of ``dy * x_hat`` (one collective), as ``SyncBatchNorm``
    does, so ``x``'s gradient is BatchNorm's over the whole batch. Forward and the local
    reductions are ATen's fused BatchNorm kernels (eval-mode, with the global statistics
    as the running ones)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        mean: torch.Tensor,  # type: ignore[override]
        var: torch.Tensor,
        eps: float,
        total: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, mean, var, total)
        ctx.eps = eps
        return torch.nn.functional.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)

    @staticmethod
    def backward(
        ctx: Any, dy: torch.Tensor
    ) -> tuple[
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,  # type: ignore[override]
        None,
        None,
        None,
        None,
    ]:
        x, weight, mean, var, total = ctx.saved_tensors
        dy = dy.contiguous()
        # eval-mode backward's weight and bias gradients are the local sums of dy * x_hat and dy
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, mean, var, None, None, False, ctx.eps, [False, True, True]
        )
        sums = torch.cat([sum_dy, sum_dy_xhat])
        distributed.all_reduce_sum_(sums)
        c = x.shape[1]
        shape = (1, c, *[1] * (x.dim() - 2))
        invstd = torch.rsqrt(var + ctx.eps)
        a = weight * invstd
        b = -a * invstd * (sums[c:] / total)
        offset = -a * (sums[:c] / total) - b * mean
        dx = torch.addcmul(offset.view(shape), dy, a.view(shape)).addcmul_(x, b.view(shape))
        return dx, sum_dy_xhat, sum_dy, None, None, None, None


def convert_global_bn(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm (1d/2d/3d, and torch's SyncBatchNorm) replaced by a
    :class:`GlobalBatchNorm` holding the same parameters and buffers (the same tensors);
    other norms (LayerNorm, GroupNorm) are left as they are. Returns the converted module
    (a new object when ``module`` itself is a BatchNorm)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        new = convert_global_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in module.modules())


@contextmanager
def local_statistics(module: nn.Module) -> Iterator[None]:
    """Inside the block, :class:`GlobalBatchNorm` layers use the local batch's statistics
    (no collective): for forward passes in train mode that only some ranks make, e.g.
    recomputing BatchNorm statistics on rank 0."""
    layers = [m for m in module.modules() if isinstance(m, GlobalBatchNorm)]
    before = [m.synchronize for m in layers]
    for m in layers:
        m.synchronize = False
    try:
        yield
    finally:
        for m, s in zip(layers, before, strict=True):
            m.synchronize = s


__all__ = ["GlobalBatchNorm", "convert_global_bn", "has_batch_norm", "local_statistics"]

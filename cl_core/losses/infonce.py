"""InfoNCE for query/key contrast: MoCo's loss with a queue of negatives [0, 1] and MoCo
v3's loss with the keys of the whole (gathered) batch as negatives [2].

Both compare L2-normalised queries q (N, D) with keys; a query's positive is the key of
the other view of the same image, and the loss is the cross entropy of the
temperature-scaled cosine logits against the positive's index:
``-log(exp(q.k+ / T) / sum_k exp(q.k / T))`` averaged over the N local queries.

- [0] He et al., Momentum Contrast for Unsupervised Visual Representation Learning,
  2019, https://arxiv.org/abs/1911.05722 (Eq. 1, Algorithm 1)
- [1] Chen et al., Improved Baselines with Momentum Contrastive Learning, 2020,
  https://arxiv.org/abs/2003.04297
- [2] Chen, Xie, He, An Empirical Study of Training Self-Supervised Vision Transformers,
  2021, https://arxiv.org/abs/2104.02057 (Sec. 3, Eq. 1, Algorithm 1)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cl_core import distributed


class InfoNCEResult(NamedTuple):
    loss: torch.Tensor  # scalar, float32, differentiable
    top1: torch.Tensor  # scalar, detached: fraction of queries whose positive has the largest logit


def _check(name: str, q: torch.Tensor, k: torch.Tensor, temperature: float) -> None:
    if q.dim() != 2 or q.shape != k.shape:
        raise ValueError(
            f"{name}: expected queries and keys of equal shape (N, D), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{name}: temperature must be a finite number > 0, got {temperature!r}")


def _result(logits: torch.Tensor, labels: torch.Tensor) -> InfoNCEResult:
    loss = F.cross_entropy(logits, labels)
    top1 = (logits.detach().argmax(dim=1) == labels).float().mean()
    return InfoNCEResult(loss, top1)


def queue_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> InfoNCEResult:
    """MoCo's InfoNCE [0]: each query against its own key (the positive, logit index 0)
    and the ``K`` queued keys (negatives).

    Args:
        q: (N, D) queries (normalised here).
        k: (N, D) positive keys, row i for query i (normalised here; normally detached).
        queue: (K, D) negative keys, expected L2-normalised (as :class:`KeyQueue` keeps
            them). Pass a copy that later in-place enqueues cannot change (autograd keeps
            it for the backward of the matmul).
        temperature: T > 0 (MoCo v1: 0.07; v2: 0.2).

    Logits are ``[q.k, q.queue^T] / T`` of shape (N, 1 + K), computed in float32.
    """
    _check("queue_infonce", q, k, temperature)
    if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue_infonce: queue must be (K, {q.shape[1]}), got {tuple(queue.shape)}")
    with torch.autocast(q.device.type, enabled=False):  # float32 logits even under bf16 autocast
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1)
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
        l_neg = q @ queue.float().T  # (N, K), one matmul
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return _result(logits, labels)


def gathered_infonce(
    q: torch.Tensor, k: torch.Tensor, temperature: float, *, gather_distributed: bool = True
) -> InfoNCEResult:
    """MoCo v3's contrast [2]: each local query against the keys of the whole batch.

    With ``gather_distributed`` and a process group of W workers, the keys of every
    worker are concatenated in rank order (W*N keys); query i of rank r has its positive
    at column ``r * N + i`` and the other W*N - 1 keys are its negatives. Keys that
    carry gradients are gathered with the autograd-correct :func:`distributed.gather`,
    detached keys (a momentum encoder's) with :func:`distributed.gather_nograd`.

    Returns the plain cross entropy; MoCo v3 scales it by ``2 T`` itself (Algorithm 1).
    """
    _check("gathered_infonce", q, k, temperature)
    with torch.autocast(q.device.type, enabled=False):  # float32 logits even under bf16 autocast
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1)
        if gather_distributed:
            keys = distributed.gather(k) if k.requires_grad else distributed.gather_nograd(k)  # (WN, D)
            r = distributed.rank()
        else:
            keys, r = k, 0
        logits = q @ keys.T / temperature  # (N, WN), one matmul
    n = q.shape[0]
    labels = torch.arange(n, device=q.device) + r * n  # positives on this rank's diagonal block
    return _result(logits, labels)

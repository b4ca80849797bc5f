"""CPC's InfoNCE over a grid of patch embeddings [0, 1].

- [0] van den Oord, Li, Vinyals. Representation Learning with Contrastive Predictive
  Coding, 2018, https://arxiv.org/abs/1807.03748 (Eq. 4)
- [1] Hénaff et al., Data-Efficient Image Recognition with Contrastive Predictive Coding,
  2019, https://arxiv.org/abs/1905.09272 (the InfoNCE objective; App. A pseudo-code)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_core import distributed


class GridInfoNCE(nn.Module):
    """InfoNCE of predictions of patch embeddings ``offset`` rows further down.

    ``targets`` (N, R, Q, D) are the patch embeddings z[n, i, j]; ``preds[k]`` (N, R - k,
    Q, D) the predictions made at context rows 0..R-k-1 for the rows k..R-1 below them.
    The prediction for z[n, i + k, j] scores every patch embedding of the batch by the dot
    product (no normalisation, no temperature, as in CPC); its positive is z[n, i + k, j],
    its negatives all other patches: other positions of the same image and every
    position of the other images (of all workers with ``gather_distributed``; the keys
    are gathered with gradient and the labels offset by rank). The loss is the mean
    cross-entropy over the predictions of each offset, averaged over the offsets.

    Returns ``(loss, accuracy)``: accuracy is the fraction of predictions whose positive
    scores highest (detached).
    """

    def __init__(self, gather_distributed: bool = True) -> None:
        super().__init__()
        self.gather_distributed = gather_distributed

    def forward(self, preds: dict[int, torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if targets.dim() != 4:
            raise ValueError(f"GridInfoNCE: targets must be (N, R, Q, D), got {tuple(targets.shape)}")
        if not preds:
            raise ValueError("GridInfoNCE: no predictions")
        n, r, q, d = targets.shape
        dev = targets.device
        keys = targets.float().reshape(n * r * q, d)
        if self.gather_distributed:
            keys, rank = distributed.gather(keys), distributed.rank()  # (W N R Q, D)
        else:
            rank = 0
        anchors, labels, which = [], [], []
        for t, (k, p) in enumerate(sorted(preds.items())):
            if not 1 <= k < r or p.shape != (n, r - k, q, d):
                raise ValueError(
                    f"GridInfoNCE: offset {k} needs predictions of shape {(n, r - k, q, d)} "
                    f"for a grid of {r} rows, got {tuple(p.shape)}"
                )
            img, row, col = torch.meshgrid(
                torch.arange(n, device=dev), torch.arange(k, r, device=dev), torch.arange(q, device=dev), indexing="ij"
            )
            anchors.append(p.float().reshape(-1, d))
            labels.append(((rank * n + img) * r * q + row * q + col).reshape(-1))  # the target z[n, i + k, j]
            which.append(torch.full((p.shape[0] * p.shape[1] * q,), t, device=dev))
        a, y, w = torch.cat(anchors), torch.cat(labels), torch.cat(which)
        with torch.autocast(dev.type, enabled=False):  # float32 scores even under bf16 autocast
            logits = a @ keys.T  # every offset's predictions against every patch: one matmul
            ce = F.cross_entropy(logits, y, reduction="none")
        per_offset = torch.zeros(len(preds), device=dev).index_add(0, w, ce) / torch.bincount(w, minlength=len(preds))
        acc = (logits.detach().argmax(dim=1) == y).float().mean()
        return per_offset.mean(), acc

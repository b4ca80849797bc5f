"""Multi-crop plumbing shared by SwAV [0] and DINO [1]: checking the views and running
a backbone once per resolution.

- [0] Caron et al., Unsupervised Learning of Visual Features by Contrasting Cluster
  Assignments, 2020, https://arxiv.org/abs/2006.09882 (Sec. 3.2, multi-crop)
- [1] Caron et al., Emerging Properties in Self-Supervised Vision Transformers, 2021,
  https://arxiv.org/abs/2104.14294 (Sec. 3.1)
"""

from __future__ import annotations

import torch
from torch import nn


def check_multicrop(views: list[torch.Tensor], who: str) -> int:
    """Validate multi-crop ``views`` (2 global views of equal size first, then any number
    of local views, all with the same batch size); returns the batch size."""
    if len(views) < 2:
        raise ValueError(f"{who}: multi-crop needs at least the 2 global views, got {len(views)} view(s)")
    if views[0].shape != views[1].shape:
        raise ValueError(
            f"{who}: the 2 global views must have the same shape, got {tuple(views[0].shape)} "
            f"and {tuple(views[1].shape)}"
        )
    n = views[0].shape[0]
    if any(v.shape[0] != n for v in views):
        raise ValueError(f"{who}: every view needs the same batch size, got {[v.shape[0] for v in views]}")
    return n


def forward_by_resolution(backbone: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Features of all ``views`` (each (N, C, H, W)), in view order, as (len(views) * N, F).

    Consecutive views of the same spatial size go through ``backbone`` as one batch (as
    SwAV's and DINO's code do): two passes for 2 global + n local crops, and every
    view of one size shares the batch-norm statistics of that pass.
    """
    feats: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        feats.append(backbone(torch.cat(views[start:end])))
        start = end
    return torch.cat(feats)

"""Shuffling BN [0]: run a (key) encoder on a batch shuffled across workers.

With batch norm computed per worker, a query and its key would see statistics of the
same sub-batch, which leaks information the model can use to find the positive ("cheat"
the pretext task). MoCo shuffles the key batch across workers before the key encoder
and restores the order afterwards, so a key's BN statistics come from a different
subset of samples than its query's.

- [0] He et al., Momentum Contrast for Unsupervised Visual Representation Learning,
  2019, https://arxiv.org/abs/1911.05722 (Sec. 3.3, "Shuffling BN")
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cl_core import distributed


@torch.no_grad()
def shuffled_forward(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, gather_distributed: bool = True
) -> torch.Tensor:
    """``fn`` applied to a random permutation of the global batch, returned in the
    original order of this worker's samples (no gradient).

    Every worker gathers the inputs of all workers (W*B samples in rank order), takes
    the permutation ``perm`` drawn on rank 0 and broadcast, and runs ``fn`` on its chunk
    ``perm[r*B:(r+1)*B]`` of the global batch. The outputs are gathered again: global
    row j is the output for sample ``perm[j]``, so sample i's output sits at row
    ``argsort(perm)[i]``, and this worker keeps rows ``argsort(perm)[r*B:(r+1)*B]``.
    With one worker (or ``gather_distributed=False``) the batch is permuted locally,
    which leaves BN statistics unchanged but keeps one code path. Assumes the same B on
    every worker.
    """
    if gather_distributed:
        world, r = distributed.world_size(), distributed.rank()
        x_all = distributed.gather_nograd(x)  # (W*B, ...)
    else:
        world, r, x_all = 1, 0, x.detach()
    b = x.shape[0]
    perm = torch.randperm(world * b, device=x.device)
    if world > 1:
        distributed.broadcast_(perm, src=0)  # one permutation for every worker
    mine = slice(r * b, (r + 1) * b)
    y = fn(x_all[perm[mine]])  # (B, ...) outputs of this worker's shuffled chunk
    y_all = distributed.gather_nograd(y) if world > 1 else y  # row j: output for sample perm[j]
    return y_all[torch.argsort(perm)[mine]]

"""Memory structures that keep keys between steps: MoCo's queue [0] and the memory bank
of InstDisc [1] / CMC [2]. Both are buffers (in ``state_dict``, so a resumed run has
the same keys) and are filled with keys gathered from all workers, so every worker
holds the same queue or bank.

- [0] He et al., Momentum Contrast, 2020, https://arxiv.org/abs/1911.05722 (Sec. 3.2)
- [1] Wu et al., Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination, 2018, https://arxiv.org/abs/1805.01978 (Sec. 3.2, Eq. 8)
- [2] Tian et al., Contrastive Multiview Coding, 2019, https://arxiv.org/abs/1906.05849
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_core import distributed


class KeyQueue(nn.Module):
    """A FIFO queue of ``size`` L2-normalised keys of dimension ``dim``.

    ``enqueue(keys)`` gathers the keys of all workers (rank order) and overwrites the
    oldest entries, wrapping around; ``ptr`` is the next slot to write. It starts as
    random unit vectors, as in MoCo's code.
    """

    queue: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.size, self.dim = size, dim
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, gather: bool = True) -> None:
        """Write ``keys`` (all workers' with ``gather``, else this worker's) over the oldest entries."""
        keys = (distributed.gather_nograd(keys) if gather else keys.detach()).to(self.queue.dtype)
        n = keys.shape[0]
        if n > self.size:
            keys, n = keys[-self.size :], self.size
        idx = (self.ptr + torch.arange(n, device=keys.device)) % self.size
        self.queue[idx] = keys
        self.ptr.copy_((self.ptr + n) % self.size)

    def forward(self) -> torch.Tensor:  # (size, dim), detached
        return self.queue.detach()


class MemoryBank(nn.Module):
    """One ``dim``-vector per training sample (``size`` samples), L2-normalised.

    ``update(index, features, momentum)`` sets, for every gathered (index, feature),
    ``v <- normalize(m * v + (1 - m) * f)`` (InstDisc's proximal update, Eq. 8);
    ``momentum=0`` replaces the entry. ``sample(n, k)`` draws ``k`` random entries per
    row (uniform, as InstDisc's NCE noise distribution).
    """

    bank: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 2:
            raise ValueError(f"memory bank size must be >= 2 (one per training sample), got {size}")
        self.size, self.dim = size, dim
        # InstDisc initialises the bank uniformly in [-std, std], std = 1/sqrt(dim/3); normalised here
        std = 1.0 / (dim / 3) ** 0.5
        self.register_buffer("bank", F.normalize(torch.rand(size, dim) * 2 * std - std, dim=1))

    def check_index(self, index: torch.Tensor) -> None:
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.size):
            raise ValueError(
                f"memory bank of {self.size} entries got sample index {int(index.max())}; set the "
                "method's bank size to the training split's size"
            )

    @torch.no_grad()
    def update(self, index: torch.Tensor, features: torch.Tensor, momentum: float, gather: bool = True) -> None:
        """Proximal update of the entries at ``index`` (all workers' pairs with ``gather``)."""
        if gather:
            index, features = distributed.gather_nograd(index), distributed.gather_nograd(features)
        features = features.detach().to(self.bank.dtype)
        self.check_index(index)
        new = F.normalize(self.bank[index] * momentum + features * (1.0 - momentum), dim=1)
        self.bank.index_copy_(0, index, new)

    def sample(self, n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, k, dim) random entries (detached)."""
        idx = torch.randint(0, self.size, (n, k), device=self.bank.device, generator=generator)
        return self.bank[idx].detach()

    def forward(self, index: torch.Tensor) -> torch.Tensor:  # (len(index), dim), detached
        return self.bank[index].detach()

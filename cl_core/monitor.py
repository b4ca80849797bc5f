"""The kNN monitor of pretraining: val top-1 of a weighted kNN whose bank is (a bounded
part of) the labeled training split, with features streamed from the shards.

Nothing is held between calls but the shard addresses: each call decodes at most
``max_bank`` training and ``max_val`` val samples in shard order, in batches of
``batch_size`` through the encoder on ``device``, and keeps only their features (N x D
floats), so the memory it takes does not grow with the data set.

Under a process group every rank calls the monitor: rank ``r`` of ``W`` decodes and
encodes the samples at positions ``r, r + W, ...`` only (the others' bytes are read and
skipped), and one all_gather puts the features back in shard order on every rank, so the
result is the single-process one in a ``W``-th of the time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from cl_core import distributed
from cl_core.data.reader import decode_sample, sample_pipeline
from cl_core.evaluate import knn_top1, stream_features


def _part(
    samples: Iterable[dict[str, Any]], limit: int | None, rank: int, world: int
) -> Iterator[tuple[Image.Image, int, int]]:
    """The decoded samples at positions ``rank, rank + world, ...`` of the first ``limit``."""
    for i, sample in enumerate(samples):
        if limit is not None and i >= limit:
            return
        if i % world == rank:
            yield decode_sample(sample)


def _interleave(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's part (rank ``r`` holds positions ``r, r + W, ...``), gathered, in position order."""
    world = distributed.world_size()
    dim = features.shape[1] if features.dim() == 2 else 0  # 0: an empty part
    sizes = distributed.gather_nograd(torch.tensor([[len(labels), dim]], device=features.device)).tolist()
    counts = [c for c, _ in sizes]
    n, dim = max(counts), max(d for _, d in sizes)
    pad_f = torch.zeros(n, dim, device=features.device)
    pad_f[: len(labels)] = features.reshape(len(labels), dim)
    pad_y = torch.full((n,), -1.0, device=features.device)
    pad_y[: len(labels)] = labels.float()
    both = distributed.gather_nograd(torch.cat([pad_f, pad_y.unsqueeze(1)], 1).unsqueeze(0))  # (W, n, dim + 1)
    total = sum(counts)
    # position i is rank i % W's entry i // W
    order = torch.arange(total)
    rows = both[order % world, order // world]
    return rows[:, :dim].contiguous(), rows[:, dim].round().long()


class KnnMonitor:
    """``monitor(encoder)`` -> val kNN top-1, the bank and the queries read from shards."""

    def __init__(
        self,
        bank_urls: Sequence[str],
        val_urls: Sequence[str],
        transform: Callable[[Any], torch.Tensor],
        *,
        k: int,
        temperature: float,
        max_bank: int | None,
        max_val: int | None,
        device: str | torch.device = "cpu",
        batch_size: int = 512,
        bank_verify: Mapping[str, Mapping] | None = None,
        val_verify: Mapping[str, Mapping] | None = None,
    ):
        self.bank_urls, self.val_urls, self.transform = list(bank_urls), list(val_urls), transform
        self.k, self.temperature = k, temperature
        self.max_bank, self.max_val = max_bank, max_val
        self.device, self.batch_size = device, batch_size
        self.bank_verify, self.val_verify = bank_verify, val_verify

    def features(
        self, encoder: nn.Module, urls: Sequence[str], limit: int | None, verify: Mapping[str, Mapping] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The features and labels of the first ``limit`` samples of ``urls``, in order
        (this rank's part, gathered, under a process group)."""
        world = distributed.world_size()
        if world == 1:
            return stream_features(
                encoder,
                sample_pipeline(urls, verify=verify),
                self.transform,
                limit=limit,
                batch_size=self.batch_size,
                device=self.device,
            )
        part = _part(sample_pipeline(urls, verify=verify, decode=None), limit, distributed.rank(), world)
        f, y = stream_features(encoder, part, self.transform, batch_size=self.batch_size, device=self.device)
        return _interleave(f.to(self.device), y.to(self.device))

    def __call__(self, encoder: nn.Module) -> float:
        """Val kNN top-1; under a process group, every rank calls it and gets the same value."""
        fb, yb = self.features(encoder, self.bank_urls, self.max_bank, self.bank_verify)
        fv, yv = self.features(encoder, self.val_urls, self.max_val, self.val_verify)
        return knn_top1(fb, yb, fv, yv, k=self.k, temperature=self.temperature)

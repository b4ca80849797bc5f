"""The kNN monitor of pretraining: val top-1 of a weighted kNN whose bank is (a bounded
part of) the labeled training split, with features streamed from the shards.

Nothing is held between calls but the shard addresses: each call decodes at most
``max_bank`` training and ``max_val`` val samples in shard order, in batches of
``batch_size`` through the encoder on ``device``, and keeps only their features (N x D
floats), so the memory it takes does not grow with the data set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cl_core.data.reader import sample_pipeline
from cl_core.evaluate import knn_top1, stream_features


class KnnMonitor:
    """``monitor(encoder)`` -> val kNN top-1, the bank and the queries read from shards."""

    def __init__(self, bank_urls: Sequence[str], val_urls: Sequence[str], transform: Callable[[Any], torch.Tensor], *,
                 k: int, temperature: float, max_bank: int | None, max_val: int | None,
                 device: str | torch.device = "cpu", batch_size: int = 512,
                 bank_verify: Mapping[str, Mapping] | None = None, val_verify: Mapping[str, Mapping] | None = None):
        self.bank_urls, self.val_urls, self.transform = list(bank_urls), list(val_urls), transform
        self.k, self.temperature = k, temperature
        self.max_bank, self.max_val = max_bank, max_val
        self.device, self.batch_size = device, batch_size
        self.bank_verify, self.val_verify = bank_verify, val_verify

    def features(self, encoder: nn.Module, urls: Sequence[str], limit: int | None,
                 verify: Mapping[str, Mapping] | None) -> tuple[torch.Tensor, torch.Tensor]:
        return stream_features(encoder, sample_pipeline(urls, verify=verify), self.transform, limit=limit,
                               batch_size=self.batch_size, device=self.device)

    def __call__(self, encoder: nn.Module) -> float:
        fb, yb = self.features(encoder, self.bank_urls, self.max_bank, self.bank_verify)
        fv, yv = self.features(encoder, self.val_urls, self.max_val, self.val_verify)
        return knn_top1(fb, yb, fv, yv, k=self.k, temperature=self.temperature)

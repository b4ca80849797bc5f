"""The kNN monitor of pretraining: val top-1 of a weighted kNN whose bank is (a bounded
part of) the labeled training split, with features streamed from the shards.

Nothing is held between calls but the shard addresses: each call decodes at most
``max_bank`` training and ``max_val`` val samples in shard order, in batches of
``batch_size`` through the encoder on ``device``, and keeps only their features (N x D
floats), so the memory it takes does not grow with the data set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cl_core.data.reader import sample_pipeline
from cl_core.evaluate import knn_top1


@torch.no_grad()
def stream_features(encoder: nn.Module, samples: Iterable[tuple[Any, int, int]], transform: Callable[[Any], torch.Tensor],
                    *, limit: int | None = None, batch_size: int = 512,
                    device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) on CPU and labels (N,) of the first ``limit`` (all with None)
    ``(image, label, index)`` samples, ``batch_size`` images at a time, the encoder in eval
    mode."""
    was_training = encoder.training
    encoder.eval()
    feats: list[torch.Tensor] = []
    labels: list[int] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            feats.append(encoder(torch.stack(batch).to(device)).float().cpu())
            batch.clear()

    try:
        for img, label, _ in samples:
            if limit is not None and len(labels) >= limit:
                break
            batch.append(transform(img))
            labels.append(int(label))
            if len(batch) == batch_size:
                flush()
        flush()
    finally:
        encoder.train(was_training)
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.as_tensor(labels, dtype=torch.long)


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

"""Frozen-feature evaluation: weighted kNN and a linear probe, both as top-1 accuracy."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    encoder: nn.Module, images: torch.Tensor, *, batch_size: int = 512, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Features of ``images`` (N, C, H, W) from ``encoder`` in eval mode, on CPU."""
    was_training = encoder.training
    encoder.eval()
    out = [encoder(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    encoder.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def stream_outputs(
    modules: dict[str, nn.Module],
    samples: Iterable[tuple[Any, int, Any]],
    transform: Callable[[Any], torch.Tensor],
    *,
    limit: int | None = None,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every module's outputs (on CPU, float) and the labels of the first ``limit`` (all
    with None) ``(image, label, ...)`` samples, in one pass: ``batch_size`` images are
    transformed and stacked, then go through each module in eval mode. Only the outputs
    are kept, never the images, so memory grows with N x output size alone."""
    modes = {name: m.training for name, m in modules.items()}
    for m in modules.values():
        m.eval()
    outs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    labels: list[int] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            x = torch.stack(batch).to(device)
            for name, m in modules.items():
                outs[name].append(m(x).float().cpu())
            batch.clear()

    try:
        for sample in samples:
            if limit is not None and len(labels) >= limit:
                break
            batch.append(transform(sample[0]))
            labels.append(int(sample[1]))
            if len(batch) == batch_size:
                flush()
        flush()
    finally:
        for name, m in modules.items():
            m.train(modes[name])
    return (
        {name: torch.cat(o) if o else torch.empty(0) for name, o in outs.items()},
        torch.as_tensor(labels, dtype=torch.long),
    )


def stream_features(
    encoder: nn.Module,
    samples: Iterable[tuple[Any, int, Any]],
    transform: Callable[[Any], torch.Tensor],
    *,
    limit: int | None = None,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`stream_outputs` of one encoder: features (N, D) and labels (N,)."""
    outs, labels = stream_outputs({"f": encoder}, samples, transform, limit=limit, batch_size=batch_size, device=device)
    return outs["f"], labels


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
    max_elements: int = 1 << 24,
) -> torch.Tensor:
    """Weighted kNN of InstDisc [0]: cosine similarity on L2-normalised features, the k
    nearest training samples vote for their class with weight exp(s / T).

    - [0] Wu et al., Unsupervised Feature Learning via Non-Parametric Instance
      Discrimination, CVPR 2018, https://arxiv.org/abs/1805.01978 (Sec. 3.4)
    """
    if temperature <= 0:
        raise ValueError(f"knn temperature must be > 0, got {temperature}")
    bank = F.normalize(train_features.float(), dim=1)  # (M, D)
    k = min(k, bank.shape[0])
    # queries per similarity block: at most max_elements scores (64 MiB) at once, whatever the bank's size
    chunk = max(1, min(chunk, max_elements // max(1, bank.shape[0])))
    preds = []
    for i in range(0, len(query_features), chunk):
        q = F.normalize(query_features[i : i + chunk].float(), dim=1)  # (B, D)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (B, k)
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(
        train_features, train_labels, test_features, num_classes=num_classes, k=k, temperature=temperature
    )
    return (pred == test_labels).float().mean().item()


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS with
    an L2 penalty). Returns ``(weight, bias)`` acting on the raw features (the
    standardisation folded in): ``logits = features @ weight.T + bias``."""
    x = features.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    clf = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), labels) + weight_decay * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        weight = clf.weight / std
        return weight, clf.bias - weight @ mean


def linear_probe_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> float:
    """Top-1 on the test features of :func:`fit_linear_probe` fitted on the train ones."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight, bias = fit_linear_probe(
        train_features, train_labels, num_classes, weight_decay=weight_decay, max_iter=max_iter
    )
    with torch.no_grad():
        return ((test_features.float() @ weight.T + bias).argmax(1) == test_labels).float().mean().item()


def top1(logits_or_pred: torch.Tensor, labels: torch.Tensor) -> float:
    pred = logits_or_pred.argmax(1) if logits_or_pred.dim() == 2 else logits_or_pred
    return (pred == labels).float().mean().item()


def recalibrate_batch_norm(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> None:
    """Replace every BatchNorm layer's running statistics with their exact average over
    ``images`` (precise BN: Wu and Johnson, Rethinking "Batch" in BatchNorm, 2021, Sec. 3).

    Fine-tuning on a few labels takes too few steps for the running averages
    (momentum 0.1) to follow the weights, and it sees cropped views while evaluation
    sees whole images; evaluated with such stale statistics, the fine-tuned
    classifier's val top-1 swings from epoch to epoch far more than its loss. The
    model's mode and each layer's momentum are restored; nothing else changes."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or len(images) == 0:
        return
    was, momenta = model.training, [m.momentum for m in norms]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for m in norms:
        m.reset_running_stats()
    model.train()
    seen = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            if len(chunk) < 2 and seen:  # a batch of 1 has no variance
                break
            for m in norms:  # each batch weighs by its size: the average over all images
                m.momentum = len(chunk) / (seen + len(chunk))
            model(chunk.to(device))
            seen += len(chunk)
    for m, mom in zip(norms, momenta, strict=True):
        m.momentum = mom
    model.train(was)

"""Plots logged as MLflow artifacts (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(history: list[dict], path: Path, title: str) -> Path:
    """Loss (left axis) and val kNN top-1 (right axis) per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(epochs, [h["train/loss"] for h in history], color="tab:blue", label="train/loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train/loss", color="tab:blue")
    if any("val/knn_top1" in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get("val/knn_top1", float("nan")) for h in history], color="tab:orange")
        ax2.set_ylabel("val/knn_top1", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

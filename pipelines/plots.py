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


def confusion_matrices(predictions: dict[str, list[int]], labels: list[int], class_names: list[str], path: Path,
                       title: str) -> Path:
    """One confusion matrix (rows: true class, columns: predicted) per model, side by side."""
    import numpy as np

    k = len(class_names)
    n = max(1, len(predictions))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.6, 3.8), dpi=100, squeeze=False)
    y = np.asarray(labels)
    for ax, (name, pred) in zip(axes[0], predictions.items(), strict=False):
        cm = np.zeros((k, k), dtype=int)
        np.add.at(cm, (y, np.asarray(pred)), 1)
        ax.imshow(cm, cmap="Blues")
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(k), class_names, fontsize=6, rotation=90)
        ax.set_yticks(range(k), class_names, fontsize=6)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}: top-1 {float((y == np.asarray(pred)).mean()):.3f}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

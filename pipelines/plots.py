"""Plots logged as MLflow artifacts (matplotlib, Agg backend).

matplotlib is imported on first use: the stage modules that import this one also run in
every Ray Train worker and Tune trial process, which never plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(history: list[dict], path: Path, title: str) -> Path:
    """Loss (left axis) and val kNN top-1 (right axis) per epoch."""
    plt = _pyplot()
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


def metric_curves(series: dict[str, list[tuple[int, float]]], path: Path, title: str, ylabel: str) -> Path:
    """One line per name over its (step, value) points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def confusion_matrices(
    predictions: dict[str, list[int]], labels: list[int], class_names: list[str], path: Path, title: str
) -> Path:
    """One confusion matrix (rows: true class, columns: predicted) per model, side by side."""
    plt = _pyplot()
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
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if cm[i, j] > cm.max() / 2 else "black",
                    )
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


def sweep_plots(rows: list[dict], names: list[str], metric: str, max_epochs: int, out: Path) -> list[Path]:
    """A sweep's figures: the objective against each swept value, a heatmap when two
    values vary (temperature x momentum when both are swept), and every trial's curve
    per epoch with the trials ASHA stopped marked where they stopped."""
    plt = _pyplot()
    paths = []
    for name in names:
        xs = [r[name] for r in rows]
        if not all(isinstance(x, (int, float)) for x in xs):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        done = [r for r in rows if not r["stopped_early"]]
        stopped = [r for r in rows if r["stopped_early"]]
        ax.scatter([r[name] for r in done], [r["last"] for r in done], label=f"ran {max_epochs} epochs")
        ax.scatter(
            [r[name] for r in stopped],
            [r["last"] for r in stopped],
            marker="x",
            color="tab:red",
            label="stopped by ASHA (last value)",
        )
        if min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {name}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"objective_vs_{name}.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    numeric = [n for n in names if all(isinstance(r[n], (int, float)) for r in rows)]
    if len(numeric) >= 2:
        a, b = ("temperature", "momentum") if {"temperature", "momentum"} <= set(numeric) else tuple(numeric[:2])
        av, bv = sorted({r[a] for r in rows}), sorted({r[b] for r in rows})
        grid = [[float("nan")] * len(av) for _ in bv]
        for r in rows:
            i, j = bv.index(r[b]), av.index(r[a])
            grid[i][j] = r["last"] if grid[i][j] != grid[i][j] else max(grid[i][j], r["last"])
        fig, ax = plt.subplots(figsize=(1.2 * len(av) + 2, 0.6 * len(bv) + 2), dpi=100)
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(av)), [f"{v:.3g}" for v in av])
        ax.set_yticks(range(len(bv)), [f"{v:.3g}" for v in bv])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white", fontsize=7)
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        fig.colorbar(im, ax=ax, label=metric)
        fig.tight_layout()
        paths.append(out / f"heatmap_{a}_x_{b}.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for r in rows:
        epochs = list(range(1, len(r["curve"]) + 1))
        (line,) = ax.plot(epochs, r["curve"], marker="o", markersize=3, label=r["trial"][:40])
        if r["stopped_early"] and r["curve"]:
            ax.plot(epochs[-1], r["curve"][-1], marker="x", color="tab:red", markersize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title("trials (x: stopped by ASHA)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out / "trial_curves.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths

"""Label-fraction subsets: the few labels of semi-supervised learning (SimCLRv2 [0]).

SimCLRv2 fine-tunes on 1% and 10% of ImageNet's labels, class-balanced subsets fixed
in advance so results can be compared. Here the subsets are drawn from the training
split only, stratified by class, deterministic per seed, and nested: the 1% subset is
contained in the 10% subset of the same seed (each class draws from one permutation).

- [0] Chen et al., Big Self-Supervised Models are Strong Semi-Supervised Learners,
  2020, https://arxiv.org/abs/2006.10029 (Sec. 4: 1% / 10% label subsets)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class LabelFractionError(ValueError):
    """A label fraction that cannot give every class at least one labeled example."""


def fraction_name(fraction: float) -> str:
    """A stable short name: 0.1 -> '10pct', 0.01 -> '1pct', 0.005 -> '0.5pct'."""
    pct = round(fraction * 100, 6)
    return f"{pct:g}pct".replace(".", "p") if pct != int(pct) else f"{int(pct)}pct"


def subset_sizes(class_counts: dict[int, int], fraction: float) -> dict[int, int]:
    """Per-class sizes of a ``fraction`` subset: ``round(fraction * N)`` labels in all,
    each class its proportional share (largest remainder) but at least one. Raises
    :class:`LabelFractionError` when that leaves a class without labels."""
    if not 0 < fraction <= 1:
        raise LabelFractionError(f"label fraction {fraction} must be in (0, 1]")
    empty = [c for c, n in class_counts.items() if n == 0]
    if empty:
        raise LabelFractionError(f"class(es) {empty} have no training samples, so no label subset can cover them")
    n, k = sum(class_counts.values()), len(class_counts)
    total = int(round(fraction * n))
    if total < k:
        need = k / n
        raise LabelFractionError(
            f"label fraction {fraction} of {n} training samples gives {total} label(s) for {k} classes, which leaves "
            f"a class with no labels; use a fraction >= {math.ceil(need * 1e4) / 1e4:g} (one label per class)"
        )
    ideal = {c: total * class_counts[c] / n for c in class_counts}
    sizes = {c: max(1, min(class_counts[c], int(ideal[c]))) for c in class_counts}
    while sum(sizes.values()) < total:  # largest remainder first
        c = max((c for c in sizes if sizes[c] < class_counts[c]), key=lambda c: (ideal[c] - sizes[c], -c))
        sizes[c] += 1
    while sum(sizes.values()) > total:  # the floor of one label overshot: take from the most over-served
        c = max((c for c in sizes if sizes[c] > 1), key=lambda c: (sizes[c] - ideal[c], -c))
        sizes[c] -= 1
    return sizes


def label_subsets(labels: Sequence[int], fractions: Sequence[float], *, seed: int) -> dict[float, list[int]]:
    """Indices (into ``labels``, sorted) of a stratified subset per fraction.

    Deterministic for (labels, seed); the subsets of smaller fractions are contained in
    those of larger ones.
    """
    y = np.asarray(labels)
    if y.size and y.min() < 0:
        raise LabelFractionError("label subsets need labeled samples; the training split has unlabeled ones")
    classes = sorted(int(c) for c in np.unique(y))
    by_class = {c: np.flatnonzero(y == c) for c in classes}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1ABE1]))
    order = {c: by_class[c][rng.permutation(len(by_class[c]))] for c in classes}
    out: dict[float, list[int]] = {}
    for f in fractions:
        sizes = subset_sizes({c: len(by_class[c]) for c in classes}, f)
        out[f] = sorted(int(i) for c in classes for i in order[c][: sizes[c]])
    return out

import numpy as np
import pytest

from cl_core.data.shards import split_refs
from cl_core.data.sources import SampleRef
from cl_core.data.subsets import LabelFractionError, fraction_name, label_subsets, subset_sizes


def _labels(n_per_class=(100, 50, 30, 7), seed=0):
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    return np.random.default_rng(seed).permutation(y)


def test_stratified_sizes_with_at_least_one_per_class():
    y = _labels()
    subs = label_subsets(y, [0.03, 0.1, 0.5], seed=0)
    for f, idx in subs.items():
        counts = np.bincount(y[idx], minlength=4)
        assert len(idx) == round(f * len(y))
        assert counts.min() >= 1
        expected = f * np.bincount(y)
        assert np.all(np.abs(counts - expected) <= 1.01 + (f < 0.05))  # proportional up to rounding and the floor of 1
    assert len(set(subs[0.1])) == len(subs[0.1])


def test_deterministic_per_seed_and_nested():
    y = _labels()
    a, b, c = (label_subsets(y, [0.05, 0.2], seed=s) for s in (3, 3, 4))
    assert a == b
    assert a[0.05] != c[0.05]
    assert set(a[0.05]) <= set(a[0.2])


def test_a_fraction_too_small_for_one_label_per_class_is_an_error():
    with pytest.raises(LabelFractionError, match=r"gives 2 label\(s\) for 4 classes.*fraction >= 0.0214"):
        label_subsets(_labels(), [0.01], seed=0)
    with pytest.raises(LabelFractionError, match="must be in"):
        subset_sizes({0: 10}, 0.0)
    with pytest.raises(LabelFractionError, match="no training samples"):
        subset_sizes({0: 10, 1: 0}, 0.5)


def test_subsets_come_from_the_train_split_only():
    refs = [SampleRef(id=f"img{i}", index=i, label=i % 10) for i in range(1000)]
    splits = split_refs(refs, val_fraction=0.15, test_fraction=0.15, seed=0, stratified=True)
    train = splits["train"]
    for _f, idx in label_subsets([r.label for r in train], [0.02, 0.1], seed=0).items():
        chosen = {train[i].id for i in idx}
        assert not chosen & {r.id for r in splits["val"]}
        assert not chosen & {r.id for r in splits["test"]}
        assert len({train[i].label for i in idx}) == 10


def test_fraction_names():
    assert [fraction_name(f) for f in (0.01, 0.1, 1.0, 0.005, 0.25)] == ["1pct", "10pct", "100pct", "0p5pct", "25pct"]

"""The IDX source (``data.source.kind: idx``): MNIST-family files, plain or gzipped, the
official test files kept as the test split, one-line errors for bad files. Small files
made here; the real Fashion-MNIST from Debian's package where it is installed."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from cl_core.data.sources import IdxSource, SourceError, open_source, read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) as an IDX file: 00 00 08 NDIM, big-endian dimensions, the data."""
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


def write_set(
    folder: Path, n_train: int = 40, n_test: int = 10, classes: int = 4, gz: bool = True, prefix: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    x = rng.integers(0, 256, (n_train + n_test, 12, 12), dtype=np.uint8)
    y = (np.arange(n_train + n_test) % classes).astype(np.uint8)
    files = {
        "train-images-idx3-ubyte": x[:n_train],
        "train-labels-idx1-ubyte": y[:n_train],
        "t10k-images-idx3-ubyte": x[n_train:],
        "t10k-labels-idx1-ubyte": y[n_train:],
    }
    for name, arr in files.items():
        data = idx_bytes(arr)
        (folder / f"{prefix}{name}{'.gz' if gz else ''}").write_bytes(gzip.compress(data) if gz else data)
    return x, y


@pytest.mark.parametrize("gz", [True, False])
def test_an_idx_folder_reads_train_and_the_official_test_set(tmp_path, gz):
    x, y = write_set(tmp_path / "set", gz=gz, prefix="emnist-letters-" if gz else "")
    src = open_source({"kind": "idx", "path": str(tmp_path / "set")})
    assert isinstance(src, IdxSource) and src.class_names == ["0", "1", "2", "3"]
    refs = src.refs()
    assert [r.id for r in refs[38:42]] == ["train-000038", "train-000039", "test-000000", "test-000001"]
    assert [r.label for r in refs] == y.tolist() and src.official_test() == set(range(40, 50))
    np.testing.assert_array_equal(src.images, x)
    assert src.describe() == {"kind": "idx", "path": str((tmp_path / "set").resolve())}


def test_the_official_test_files_are_the_test_split(tmp_path):
    from pipelines.config import load_config
    from pipelines.stages.shard import plan_splits

    write_set(tmp_path / "set")
    cfg = load_config(overrides=[f"data.source={{kind: idx, path: {tmp_path / 'set'}}}", "data.val_fraction=0.2"])
    src = open_source(cfg.data.source.model_dump(mode="json"))
    splits = plan_splits(src, src.refs(), cfg.data, seed=0)
    assert sorted(r.index for r in splits["test"]) == list(range(40, 50))  # exactly the t10k files
    assert len(splits["val"]) == 8 and len(splits["train"]) == 32  # val: 20% of the train files, per class
    assert all(r.id.startswith("train-") for r in splits["train"] + splits["val"])
    assert plan_splits(src, src.refs(), cfg.data, seed=0) == splits  # deterministic
    # subsets (the 2-core Fashion-MNIST settings): stratified, exact sizes, the test part from the t10k files only
    small = cfg.data.model_copy(update={"max_samples": 20, "max_test_samples": 5})
    cut = plan_splits(src, src.refs(), small, seed=0)
    assert len(cut["train"]) + len(cut["val"]) == 20 and len(cut["test"]) == 5
    assert {r.index for r in cut["test"]} <= set(range(40, 50))
    labels = sorted(r.label for r in cut["train"] + cut["val"])
    assert max(labels.count(c) for c in set(labels)) - min(labels.count(c) for c in set(labels)) <= 1
    assert plan_splits(src, src.refs(), small, seed=0) == cut


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"\x00\x00\x08\x01" + b[4:], "not an IDX file of images (idx3): magic 00000801, expected 00000803"),
        (lambda b: b"PK\x03\x04" + b[4:], "not an IDX file of images (idx3): magic 504b0304"),
        (lambda b: b[:-7], "truncated: 1433 data bytes for dimensions 10x12x12 (1440 expected); download it again"),
        (lambda b: b[:9], "truncated in its header"),
        (lambda b: b + b"extra", "longer than its header says"),
    ],
)
def test_a_bad_file_is_one_line_naming_it(tmp_path, damage, message):
    write_set(tmp_path / "set", gz=False)
    f = tmp_path / "set" / "t10k-images-idx3-ubyte"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(SourceError) as e:
        IdxSource(tmp_path / "set")
    assert str(e.value).startswith(f"data.source.path: {f}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_mismatched_and_missing_files_are_one_line(tmp_path):
    write_set(tmp_path / "set", gz=False)
    (tmp_path / "set" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(39, np.uint8)))
    with pytest.raises(
        SourceError,
        match="train-images-idx3-ubyte holds 40 images but train-labels-idx1-ubyte 39 "
        "labels; the two files must belong together",
    ):
        IdxSource(tmp_path / "set")
    write_set(tmp_path / "set", gz=False)  # whole again, then one file missing
    (tmp_path / "set" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(SourceError, match=r"has no file named \*t10k-labels-idx1-ubyte\[.gz\]; give a folder holding"):
        IdxSource(tmp_path / "set")
    with pytest.raises(SourceError, match="damaged gzip"):
        (tmp_path / "g").mkdir()
        (tmp_path / "g" / "x").write_bytes(b"\x1f\x8b\x08junk")
        read_idx(tmp_path / "g" / "x", 3)


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_the_debian_package():
    src = IdxSource(FASHION)
    assert (
        src.images.shape == (70000, 28, 28) and src.n_train == 60000 and src.class_names == [str(c) for c in range(10)]
    )
    assert np.bincount(src.labels[60000:]).tolist() == [1000] * 10  # the official test set: 1,000 per class

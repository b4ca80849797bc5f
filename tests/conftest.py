from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)


def make_images(n: int, size: int = 12, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tiny RGB images whose class is a bright square at a class-specific place."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, size=(n, size, size, 3), dtype=np.uint8)
    y = np.arange(n) % classes
    for i, c in enumerate(y):
        o = 1 + 3 * c
        x[i, o : o + 3, o : o + 3] = 250
    return x, y.astype(np.int64)


@pytest.fixture
def npz_file(tmp_path: Path) -> Path:
    x, y = make_images(60)
    p = tmp_path / "data.npz"
    np.savez(p, images=x, labels=y)
    return p


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    x, y = make_images(30)
    root = tmp_path / "folder"
    for i, (img, c) in enumerate(zip(x, y, strict=True)):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def png_bytes(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()

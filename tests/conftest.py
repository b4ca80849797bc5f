from __future__ import annotations

import contextlib
import io
import os
import secrets
from collections.abc import Iterator
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


@contextlib.contextmanager
def s3_server(directory: Path, bucket: str) -> Iterator:
    """A SeaweedFS S3 server on 127.0.0.1 with fresh credentials and ``bucket``; the AWS
    environment points at it inside the block, and the server is stopped by pid after."""
    from cl_core.data import storage
    from infra import procs, seaweed

    server = seaweed.start(directory, seaweed.free_s3_port(), "clpipe-test-key", secrets.token_hex(16))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        storage.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
        assert not procs.alive(server.pid)

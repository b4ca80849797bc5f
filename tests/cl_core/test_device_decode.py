"""``views.decode_on: device``: the loader ships JPEG bytes and crop boxes, the device
decodes, crops and flips. On CPU (``decode_jpeg`` on the CPU) the views match the
loader's own (PIL decode, then crop and flip as tensors) for the same per-sample seeds:
the same boxes and flips, equal pixels (JPEG: within two decoders' rounding); a PNG
sample travels as pixels; the training loop takes either batch."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cl_core.augment import MultiCropTransform, SimCLRTransform
from cl_core.augment_device import DeviceViews
from cl_core.data import shards as S
from cl_core.data.device_decode import CropPlan, EncodedBatch, collate_encoded, decode_encoded
from cl_core.data.reader import ShardStream, training_loader
from cl_core.data.sources import ImageFolderSource
from cl_core.engine import LoopConfig, TrainingLoop
from cl_core.methods.simclr import SimCLR
from tests.cl_core.test_shards import write_set


def _picture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth gradients and a few blocks: a wrong crop box or flip shows, rounding hardly."""
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([255 * xx / w, 255 * yy / h, 128 + 100 * np.sin(xx / 7.0) * np.cos(yy / 9.0)], -1)
    for _ in range(3):
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        img[y : y + 10, x : x + 10] = rng.integers(0, 256, 3)
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    """The same 12 pictures (two sizes) as JPEG files and as PNG files, sharded (8 train)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("decode")
    sets = {}
    for fmt in ("jpg", "png"):
        folder = root / fmt
        for i in range(12):
            (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            arr = _picture(rng, 60 + 8 * (i % 2), 80)
            Image.fromarray(arr).save(folder / f"c{i % 2}" / f"{i:02d}.{fmt}", quality=95)
        out = root / f"shards-{fmt}"
        out.mkdir()
        m = write_set(ImageFolderSource(folder), out, per_shard=12, min_shards=1)
        sets[fmt] = S.shard_urls(out, m, "train")
    return sets


def _batches(urls_counts, transform, encoded: bool, n_views_hflip=0.5):
    urls, counts = urls_counts
    stream = ShardStream(
        urls,
        counts,
        transform=transform,
        batch_size=4,
        rank=0,
        world_size=1,
        loader_workers=0,
        shuffle_buffer=0,
        seed=3,
        **({"decode": decode_encoded, "collate": collate_encoded} if encoded else {}),
    )
    stream.set_epoch(0)
    return list(training_loader(stream, num_workers=0))


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_device_views_match_the_loader_views(shard_sets, fmt):
    loader = _batches(
        shard_sets[fmt], SimCLRTransform(24, crop_min_scale=0.2, hflip_prob=0.5, color=False), encoded=False
    )
    device = _batches(shard_sets[fmt], CropPlan([24, 24], [(0.2, 1.0)] * 2, 0.5), encoded=True)
    assert len(loader) == len(device) == 2
    for (lv, ly, li), (db, dy, di) in zip(loader, device, strict=True):
        assert isinstance(db, EncodedBatch) and all(s.jpeg == (fmt == "jpg") for s in db.samples)
        assert torch.equal(ly, dy) and torch.equal(li, di)
        views = db.decode("cpu")
        for a, b in zip(lv, views, strict=True):
            assert a.shape == b.shape and b.dtype == torch.uint8
            # the loader's transform crops the decoded image as a tensor too: PNG pixels are equal; two JPEG
            # decoders may round apart (both are libjpeg-turbo here: equal). Another box or a missed flip is
            # 40-60 levels off on these pictures
            if fmt == "png":
                assert torch.equal(a, b)
            else:
                assert (a.float() - b.float()).abs().mean() < 1.0
    flips = torch.cat([s.flips for b, _, _ in device for s in b.samples])
    assert flips.any() and not flips.all()


def test_multi_crop_plan_draws_as_the_multi_crop_transform(shard_sets):
    tf = MultiCropTransform(
        24, 10, global_scale=(0.3, 1.0), local_scale=(0.05, 0.3), n_local=2, hflip_prob=0.5, color=False
    )
    plan = CropPlan([24, 24, 10, 10], [(0.3, 1.0)] * 2 + [(0.05, 0.3)] * 2, 0.5)
    loader = _batches(shard_sets["png"], tf, encoded=False)
    device = _batches(shard_sets["png"], plan, encoded=True)
    for (lv, _, _), (db, _, _) in zip(loader, device, strict=True):
        for a, b in zip(lv, db.decode("cpu"), strict=True):
            assert torch.equal(a, b)


def test_the_loop_trains_on_encoded_batches(shard_sets):
    urls, counts = shard_sets["jpg"]
    torch.manual_seed(0)
    method = SimCLR("small_cnn", backbone_args={"width": 4}, proj_dim=8, temperature=0.5)
    stream = ShardStream(
        urls,
        counts,
        transform=CropPlan([16, 16], [(0.2, 1.0)] * 2, 0.5),
        batch_size=4,
        rank=0,
        world_size=1,
        loader_workers=1,
        shuffle_buffer=0,
        seed=0,
        decode=decode_encoded,
        collate=collate_encoded,
    )
    cfg = LoopConfig(epochs=1, batch_size_per_worker=4, optimizer="sgd", lr_base=0.1, warmup_epochs=0, loader_workers=1)
    loop = TrainingLoop(
        method,
        method,
        stream,
        cfg,
        torch.device("cpu"),
        view_augment=DeviceViews(jitter_strength=0.5, jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.0),
    )
    history = loop.run(lambda m, s: None)
    assert len(history) == 1 and np.isfinite(history[0]["train/loss"]) and loop.step == stream.plan().steps == 2


def test_a_jpeg_header_is_all_the_loader_reads():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 70, 3), np.uint8)).save(buf, format="JPEG")
    torch.manual_seed(0)
    s = CropPlan([16], [(0.5, 1.0)], 0.0)(buf.getvalue())
    assert s.jpeg and s.data.dtype == torch.uint8 and s.data.numel() == len(buf.getvalue())
    top, left, h, w = s.boxes[0].tolist()
    assert 0 <= top <= 40 - h and 0 <= left <= 70 - w and h * w >= 0.5 * 40 * 70 * 0.74  # inside, >= min area
    assert not s.flips.any()


def test_decode_on_config(shard_sets):
    from pipelines.config import ConfigError, ViewsConfig, load_config
    from pipelines.stages._pretraining import crop_plan, decodes_on_device

    with pytest.raises(ConfigError, match=r"pretrain.views.decode_on: device needs augment_on: device"):
        load_config("default", ["pretrain.views.decode_on=device"])
    auto, jpg, png = ViewsConfig(augment_on="device"), shard_sets["jpg"][0], shard_sets["png"][0]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert decodes_on_device(auto, cuda, jpg) and not decodes_on_device(auto, cpu, jpg)
    assert not decodes_on_device(auto, cuda, png)  # PNGs would travel whole: decoded and cropped in the loader
    assert not decodes_on_device(ViewsConfig(), cuda, jpg)  # colour in the loader: decode there too
    assert decodes_on_device(ViewsConfig(augment_on="device", decode_on="device"), torch.device("cpu"))
    v = ViewsConfig(image_size=32, local_views=3, local_image_size=12, crop_min_scale=0.3, augment_on="device")
    plan = crop_plan("swav", v)
    assert plan.sizes == (32, 32, 12, 12, 12) and plan.scales[0] == (0.3, 1.0) and plan.scales[2] == (0.05, 0.14)
    assert crop_plan("simclr", v).sizes == (32, 32)

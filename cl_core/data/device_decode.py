"""Views whose JPEG decoding, cropping and flipping run on the training device.

With ``views.augment_on: device`` the colour augmentation already runs batched on the
GPU; at 224 px the loader's remaining work, decoding a JPEG and resizing each crop, is
then most of a CPU core per few hundred images. Here the loader only reads each JPEG's
header (its size) and draws every view's crop box and flip; the bytes go to the device,
where :func:`torchvision.io.decode_jpeg` decodes the whole batch (nvJPEG on CUDA) and each
view is cut and resized there.

The draws are SimCLR's ``RandomResizedCrop`` + ``RandomHorizontalFlip``, in the order
:class:`cl_core.augment.SimCLRTransform` (or the multi-crop transform) makes them, from
the same per-sample-seeded generator, and the crops are resized with the same tensor
kernel, so a sample gets the same views on both paths (the pixels can differ only where
two JPEG decoders round apart). A sample that is
not a JPEG (a PNG shard) is decoded in the loader and its whole image travels instead of
its bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.functional import pil_to_tensor
from torchvision.transforms.v2 import functional as TF

from cl_core.data.reader import decode_sample, sample_pipeline

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect ratios, as the loader's transforms use


@dataclass
class EncodedSample:
    """One image as the loader ships it: JPEG bytes (uint8, 1-D) or, for another format,
    its decoded pixels (uint8, 3 x H x W); each view's crop box (top, left, height,
    width) in the full image and its flip."""

    data: torch.Tensor
    jpeg: bool
    boxes: torch.Tensor  # [views, 4] int64
    flips: torch.Tensor  # [views] bool
    sizes: tuple[int, ...]  # each view's output side


def holds_jpeg(urls: Sequence[str]) -> bool:
    """Whether the shard set's images are JPEGs, from its first sample (a shard set is
    written from one source, whose images keep their format: JPEG files stay JPEG, the
    rest become PNG)."""
    for sample in sample_pipeline(list(urls)[:1], decode=None):
        return "jpg" in sample or "jpeg" in sample
    return False


def decode_encoded(sample: dict) -> tuple[bytes | Image.Image, int, int]:
    """A shard sample as (JPEG bytes, label, index), or as :func:`decode_sample` gives it
    (a PIL image) when its image is not a JPEG."""
    data = sample.get("jpg", sample.get("jpeg"))
    if data is None:
        return decode_sample(sample)
    return bytes(data), int(sample["cls"]) if "cls" in sample else -1, int(sample.get("__index__", -1))


class CropPlan:
    """The loader's part: each view's crop box and flip, drawn as the CPU transforms draw
    them. ``sizes`` and ``scales``: each view's output side and crop-area range."""

    def __init__(self, sizes: Sequence[int], scales: Sequence[tuple[float, float]], hflip_prob: float):
        if len(sizes) != len(scales):
            raise ValueError(f"CropPlan: {len(sizes)} sizes but {len(scales)} scales")
        self.sizes, self.scales, self.hflip_prob = tuple(int(s) for s in sizes), [tuple(s) for s in scales], hflip_prob

    def __call__(self, x: bytes | Image.Image) -> EncodedSample:
        if isinstance(x, bytes):
            with Image.open(io.BytesIO(x)) as im:  # the header only: no pixels are decoded
                width, height = im.size
            data, jpeg = torch.frombuffer(bytearray(x), dtype=torch.uint8), True
        else:
            data, jpeg = pil_to_tensor(x.convert("RGB")), False
            height, width = data.shape[-2:]
        shape = torch.empty(3, height, width, device="meta")  # get_params reads the size only
        boxes, flips = [], []
        for scale in self.scales:
            boxes.append(RandomResizedCrop.get_params(shape, list(scale), list(RATIO)))
            # v2's RandomHorizontalFlip draws once, even at p = 0, and flips unless torch.rand(1) >= p
            flips.append(bool(torch.rand(1) < self.hflip_prob))
        return EncodedSample(data, jpeg, torch.tensor(boxes, dtype=torch.int64), torch.tensor(flips), self.sizes)


class EncodedBatch:
    """A batch of :class:`EncodedSample`; :meth:`decode` gives the views on a device."""

    def __init__(self, samples: list[EncodedSample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def pin_memory(self) -> EncodedBatch:  # DataLoader(pin_memory=True) calls this
        return EncodedBatch(
            [EncodedSample(s.data.pin_memory(), s.jpeg, s.boxes, s.flips, s.sizes) for s in self.samples]
        )

    def decode(self, device: torch.device | str) -> list[torch.Tensor]:
        """Each view as a uint8 batch (B x 3 x S x S) on ``device``: the JPEGs decoded
        together, then every view cut, resized (bilinear, antialiased) and flipped."""
        device = torch.device(device)
        images: list[torch.Tensor | None] = [None] * len(self.samples)
        jpegs = [i for i, s in enumerate(self.samples) if s.jpeg]
        if jpegs:
            decoded = decode_jpeg([self.samples[i].data for i in jpegs], mode=ImageReadMode.RGB, device=device)
            for i, img in zip(jpegs, decoded, strict=True):
                images[i] = img
        for i, s in enumerate(self.samples):
            if not s.jpeg:
                images[i] = s.data.to(device, non_blocking=True)
        sizes = self.samples[0].sizes
        views = []
        for v, side in enumerate(sizes):
            out = torch.empty(len(self.samples), 3, side, side, dtype=torch.uint8, device=device)
            for b, (img, s) in enumerate(zip(images, self.samples, strict=True)):
                assert img is not None
                top, left, h, w = (int(t) for t in s.boxes[v])
                crop = TF.resized_crop(img, top, left, h, w, [side, side], antialias=True)
                out[b] = crop.flip(-1) if bool(s.flips[v]) else crop
            views.append(out)
        return views


def collate_encoded(batch: list[tuple[EncodedSample, int, int]]) -> tuple[EncodedBatch, torch.Tensor, torch.Tensor]:
    samples, labels, index = zip(*batch, strict=True)
    return EncodedBatch(list(samples)), torch.as_tensor(labels), torch.as_tensor(index)

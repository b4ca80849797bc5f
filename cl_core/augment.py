"""View generation with torchvision.transforms.v2.

All randomness comes from torch's global generator, so a view is a pure function of
the input and ``torch.manual_seed``: the reader seeds each DataLoader worker from
(seed, epoch, rank, worker) and the views of a run are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def blur_kernel(image_size: int) -> int:
    """SimCLR's blur kernel: odd, about 10% of the side."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


class SimCLRTransform:
    """SimCLR's augmentation [0, appendix A]: random resized crop, horizontal flip,
    colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur (optional: the paper drops it
    for 32 px CIFAR images), applied twice independently.

    - [0] Chen et al., 2020, https://arxiv.org/abs/2002.05709

    Args:
        image_size: output side in pixels.
        crop_min_scale: lower bound of the crop's area fraction (paper: 0.08).
        hflip_prob: probability of a horizontal flip (0 for data where left/right matters).
        jitter_strength: s in the paper (brightness/contrast/saturation 0.8s, hue 0.2s).
        jitter_prob, grayscale_prob: 0.8 and 0.2 in the paper.
        blur_prob: 0 disables blur; the paper uses 0.5 with a kernel of 10% of the side.
        n_views: number of views per image.
        color: False stops after the crop and flip and gives uint8 views; the colour
            part then runs batched on the training device
            (:class:`cl_core.augment_device.BatchColorAugment`, ``views.augment_on: device``).
    """

    def __init__(
        self,
        image_size: int = 32,
        *,
        crop_min_scale: float = 0.08,
        hflip_prob: float = 0.5,
        jitter_strength: float = 1.0,
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.0,
        n_views: int = 2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        color: bool = True,
    ) -> None:
        s = jitter_strength
        ops: list[v2.Transform] = [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(p=hflip_prob),
        ]
        if not color:
            self.transform = v2.Compose([*ops, v2.ToPureTensor()])
        else:
            ops += [
                v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=jitter_prob),
                v2.RandomGrayscale(p=grayscale_prob),
            ]
            if blur_prob > 0:
                ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel(image_size), sigma=(0.1, 2.0))], p=blur_prob))
            self.transform = v2.Compose(ops + _normalize(mean, std))
        self.n_views = n_views

    def __call__(self, image: Any) -> list[torch.Tensor]:
        return [self.transform(image) for _ in range(self.n_views)]


class MultiCropTransform:
    """Multi-crop [0]: ``n_global`` views at ``image_size`` and ``n_local`` smaller views
    at ``local_size``, each with SimCLR's colour augmentation; returns the global views
    first. SwAV uses 2x224 (scale 0.14-1) + 6x96 (scale 0.05-0.14); DINO 2x224
    (0.4-1, 0.14-1 in its ViT-S runs) + 8-10x96 (0.05-0.4).

    - [0] Caron et al., Unsupervised Learning of Visual Features by Contrasting Cluster
      Assignments, 2020, https://arxiv.org/abs/2006.09882 (Sec. 3.2)

    Args:
        image_size, local_size: sides of the global and local views.
        global_scale, local_scale: (min, max) area fractions of the crops.
        n_global, n_local: view counts.
        **color: ``hflip_prob``, ``jitter_strength``, ``jitter_prob``, ``grayscale_prob``,
            ``blur_prob``, ``color`` as in :class:`SimCLRTransform`.
    """

    def __init__(
        self,
        image_size: int,
        local_size: int,
        *,
        global_scale: tuple[float, float] = (0.14, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.14),
        n_global: int = 2,
        n_local: int = 6,
        **color: float | bool,
    ) -> None:
        if n_global < 2:
            raise ValueError(f"multi-crop needs at least 2 global views, got {n_global}")
        if n_local < 0:
            raise ValueError(f"multi-crop: n_local must be >= 0, got {n_local}")
        self.global_tf = SimCLRTransform(image_size, crop_min_scale=global_scale[0], n_views=1, **color)  # type: ignore[arg-type]
        self.global_tf.transform.transforms[1].scale = tuple(global_scale)
        self.local_tf = SimCLRTransform(local_size, crop_min_scale=local_scale[0], n_views=1, **color)  # type: ignore[arg-type]
        self.local_tf.transform.transforms[1].scale = tuple(local_scale)
        self.n_global, self.n_local = n_global, n_local

    def __call__(self, image: Any) -> list[torch.Tensor]:
        return [self.global_tf.transform(image) for _ in range(self.n_global)] + [
            self.local_tf.transform(image) for _ in range(self.n_local)
        ]


class EvalTransform:
    """Deterministic transform for feature extraction: resize, tensor, normalize."""

    def __init__(
        self, image_size: int = 32, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        self.transform = v2.Compose(
            [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True), *_normalize(mean, std)]
        )

    def __call__(self, image: Any) -> torch.Tensor:
        return self.transform(image)


class FinetuneTransform:
    """Fine-tuning and distillation views (SimCLRv2 [0]): random resized crop and
    horizontal flip only, one view per image (returned as a one-element list so the
    training loop treats it like the contrastive views).

    - [0] Chen et al., 2020, https://arxiv.org/abs/2006.10029 (Appendix: "only random
      crop and horizontal flip" during fine-tuning and distillation)
    """

    def __init__(
        self,
        image_size: int = 32,
        *,
        crop_min_scale: float = 0.08,
        hflip_prob: float = 0.5,
        n_views: int = 1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0), antialias=True),
                v2.RandomHorizontalFlip(p=hflip_prob),
                *_normalize(mean, std),
            ]
        )
        self.n_views = n_views  # 2 for a supervised contrastive (SupCon) fine-tune

    def __call__(self, image: Any) -> list[torch.Tensor]:
        return [self.transform(image) for _ in range(self.n_views)]

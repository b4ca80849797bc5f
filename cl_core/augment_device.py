"""SimCLR's colour augmentation, batched on the training device.

torchvision.transforms.v2 transforms draw one parameter set per call, so applied to a
batch they would give every image the same jitter; :class:`BatchColorAugment` draws
independent parameters per sample and applies them with batched tensor operations, on
the device the batch is on. The loader then only decodes, crops and flips, and ships
uint8 images: a quarter of the bytes of float32 over PCIe, and no jitter work in the
CPU DataLoader workers (``ColorJitter`` is most of :class:`cl_core.augment.SimCLRTransform`'s
time).

Every random draw comes from the ``torch.Generator`` passed in, on the batch's device, so
the output is a pure function of the batch and the generator's state: seeded from
(seed, epoch, rank), the views of a run are reproducible, as with the reader's seeded
workers. On CUDA, bit-for-bit repeats also need the blur's convolution algorithm to stay
fixed (``torch.backends.cudnn.benchmark`` off, its default). A call synchronises with
the host once (the sizes of the per-op sample groups).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from cl_core.augment import IMAGENET_MEAN, IMAGENET_STD, blur_kernel

# op ids, as torchvision's ColorJitter numbers them in its ``fn_idx``
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
OP_NAMES = ("brightness", "contrast", "saturation", "hue")
# columns of the one [B, N_DRAWS] uniform draw per batch (see BatchColorAugment.draw)
_JITTER, _ORDER, _FACTORS, _GRAY, _BLUR, _SIGMA = 0, 1, 5, 9, 10, 11
N_DRAWS = 12
SIGMA_RANGE = (0.1, 2.0)
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
_LUMA = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class ColorParams:
    """Per-sample parameters of one batch; all tensors have the batch as first dimension
    and live on the batch's device.

    Attributes:
        jitter: [B] bool, colour jitter applied.
        order: [B, 4] int64, a permutation of the op ids per sample: round r applies
            ``order[:, r]`` (0 brightness, 1 contrast, 2 saturation, 3 hue).
        brightness, contrast, saturation, hue: [B] float32 factors (drawn for every
            sample; used where ``jitter`` is set and the op's range is not empty).
        grayscale: [B] bool, converted to grayscale.
        blur: [B] bool, Gaussian-blurred.
        sigma: [B] float32 blur standard deviation (used where ``blur`` is set).
    """

    jitter: torch.Tensor
    order: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.jitter.shape[0])

    def factor(self, op: int) -> torch.Tensor:
        """The [B] factors of op id ``op``."""
        return (self.brightness, self.contrast, self.saturation, self.hue)[op]

    def to(self, device: torch.device | str) -> ColorParams:
        """The same parameters on ``device``."""
        return ColorParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _check_prob(name: str, p: float) -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        raise ValueError(f"BatchColorAugment: {name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _luma(img: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W], the same operations as torchvision's rgb_to_grayscale."""
    r, g, b = img.unbind(dim=1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _blend(img: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * img + (1 - ratio) * other, clamped to [0, 1]; ratio is [N, 1, 1, 1]."""
    return img.mul(ratio).add_(other.mul(1.0 - ratio)).clamp_(0.0, 1.0)


def _hsv_planes(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, 3, H, W] RGB in [0, 1] -> hue (fraction of a turn, [0, 1)), saturation and
    value, each [N, H, W]: Pillow's and torchvision's conversion (ties between channels
    go to r, then g) with one division for the hue instead of three, so equal to
    torchvision's up to float rounding."""
    r, g, b = img.unbind(dim=1)
    minc, maxc = torch.aminmax(img, dim=1)
    delta = maxc - minc
    eqc = delta == 0  # grey pixels: hue and saturation 0, and no division by zero
    ones = torch.ones_like(maxc)
    s = delta / torch.where(eqc, ones, maxc)
    is_r = maxc == r
    is_g = ~is_r & (maxc == g)
    num = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    sector = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    h = num.div_(torch.where(eqc, ones, delta)).add_(sector)  # in [-1, 5)
    h = h.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return h, s, maxc


def _rgb_from_hsv_planes(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hue, saturation, value [N, H, W] -> [N, 3, H, W] RGB: channel n (r, g, b: 5, 3, 1)
    is v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6, the closed form of
    the six-sector table (the same values up to float rounding, no gather)."""
    h6 = h.mul(6.0)
    vs = v * s
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n).remainder_(6.0)
        channels.append(v - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(channels, dim=1)


def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] RGB in [0, 1] -> HSV [N, 3, H, W], each in [0, 1] (hue as a fraction
    of a turn)."""
    return torch.stack(_hsv_planes(img), dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv.unbind(dim=1)
    return _rgb_from_hsv_planes(h, s, v)


def adjust_brightness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample torchvision ``adjust_brightness`` on float [N, C, H, W]; factor [N]."""
    return img.mul(factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample torchvision ``adjust_contrast``: blend with the mean luma."""
    gray = _luma(img) if img.shape[1] == 3 else img
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    return _blend(img, mean, factor.view(-1, 1, 1, 1))


def adjust_saturation(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample torchvision ``adjust_saturation``: blend with the luma image (C == 1:
    unchanged)."""
    if img.shape[1] == 1:
        return img
    return _blend(img, _luma(img), factor.view(-1, 1, 1, 1))


def adjust_hue(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample torchvision ``adjust_hue``: rotate the hue by ``factor`` turns
    (C == 1: unchanged)."""
    if img.shape[1] == 1:
        return img
    h, s, v = _hsv_planes(img)
    return _rgb_from_hsv_planes(h.add_(factor.view(-1, 1, 1)).remainder_(1.0), s, v)


def gaussian_blur(img: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample torchvision ``gaussian_blur`` (same kernel, reflect padding), as two
    1-D grouped convolutions with the samples' channels as groups; sigma [N]."""
    n, c, h, w = img.shape
    lim = (kernel_size - 1) / (2.0 * 2.0**0.5)
    xs = torch.linspace(-lim, lim, steps=kernel_size, dtype=img.dtype, device=img.device)
    kernel = torch.softmax(xs.unsqueeze(0).div(sigma.unsqueeze(1)).pow(2).neg(), dim=1)  # [N, k]
    kernel = kernel.repeat_interleave(c, dim=0)  # [N * C, k], one row per (sample, channel)
    pad = kernel_size // 2
    out = F.pad(img.reshape(1, n * c, h, w), [pad, pad, pad, pad], mode="reflect")
    out = F.conv2d(out, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    out = F.conv2d(out, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    return out.view(n, c, h, w)


_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


class BatchColorAugment:
    """SimCLR's colour augmentation [0, appendix A] for a batch on the training device,
    with independent random parameters per sample: colour jitter (p=0.8; brightness,
    contrast and saturation 0.8s, hue 0.2s, in a random order per sample), grayscale
    (p=0.2), Gaussian blur (optional: the paper drops it for 32 px CIFAR images), then
    normalisation. The colour part of :class:`cl_core.augment.SimCLRTransform` (which
    keeps the crop and flip in the loader); each per-sample operation equals the
    ``torchvision.transforms.v2.functional`` one with the same parameter.

    It runs on float images: the CPU path works on uint8 tensors and rounds to uint8
    after every jitter op, so the two paths draw from the same distribution up to that
    rounding. uint8 input is scaled as ``v2.ToDtype(torch.float32, scale=True)`` does
    (times 1/255) and normalised as ``v2.Normalize``, so with every probability 0 the
    output equals SimCLRTransform's last two steps bit for bit.

    - [0] Chen et al., 2020, https://arxiv.org/abs/2002.05709

    Args:
        image_size: side of the views in pixels (sets the blur kernel, ~10% of it).
        jitter_strength: s in the paper (brightness/contrast/saturation 0.8s, hue 0.2s).
        jitter_prob, grayscale_prob: 0.8 and 0.2 in the paper.
        blur_prob: 0 disables blur; the paper uses 0.5 with a kernel of 10% of the side
            and sigma uniform in [0.1, 2.0].
        mean, std: per-channel normalisation (1 value, or one per channel of the input).

    Call it with a batch ``[B, C, H, W]`` (C = 1 or 3; uint8 in 0..255 or float in
    0..1; any device and memory format) and a ``torch.Generator`` on the batch's device;
    it returns float32 normalised images on the same device in the same memory format.
    ``__call__`` is :meth:`draw` then :meth:`apply`.
    """

    def __init__(
        self,
        image_size: int,
        *,
        jitter_strength: float = 1.0,
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f"BatchColorAugment: image_size must be a positive int, got {image_size!r}")
        s = jitter_strength
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.0 <= s <= 2.5:
            # hue range 0.2s must stay within torchvision's [-0.5, 0.5]
            raise ValueError(f"BatchColorAugment: jitter_strength must be in [0, 2.5], got {s!r}")
        self.jitter_prob = _check_prob("jitter_prob", jitter_prob)
        self.grayscale_prob = _check_prob("grayscale_prob", grayscale_prob)
        self.blur_prob = _check_prob("blur_prob", blur_prob)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(v) for v in std)
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, 3):
                raise ValueError(f"BatchColorAugment: {name} must have 1 or 3 values, got {len(values)}")
        if not all(self.std):
            raise ValueError(f"BatchColorAugment: std must be non-zero, got {self.std}")
        self.image_size = image_size
        self.jitter_strength = float(s)
        # (low, high) per op, as torchvision's ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)
        self.ranges: tuple[tuple[float, float], ...] = (
            (max(0.0, 1.0 - 0.8 * s), 1.0 + 0.8 * s),
            (max(0.0, 1.0 - 0.8 * s), 1.0 + 0.8 * s),
            (max(0.0, 1.0 - 0.8 * s), 1.0 + 0.8 * s),
            (-0.2 * s, 0.2 * s),
        )
        # an op whose range is a single point is skipped, as torchvision does
        self.active = tuple(lo != hi for lo, hi in self.ranges)
        self.kernel_size = blur_kernel(image_size)  # as SimCLRTransform's
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, jitter_strength={self.jitter_strength}, "
            f"jitter_prob={self.jitter_prob}, grayscale_prob={self.grayscale_prob}, "
            f"blur_prob={self.blur_prob}, kernel_size={self.kernel_size})"
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self._check_input(x)
        return self.apply(x, self.draw(x.shape[0], generator, x.device))

    def draw(
        self, batch_size: int, generator: torch.Generator, device: torch.device | str | None = None
    ) -> ColorParams:
        """Draw the parameters of ``batch_size`` samples: one ``torch.rand((batch_size,
        12), generator=generator)`` on ``device`` (default: the generator's), whose
        columns are, per sample: 0 jitter gate (applied if < jitter_prob); 1-4 sort keys
        of the op order (argsort: a uniform random permutation); 5-8 brightness,
        contrast, saturation, hue (scaled onto their ranges); 9 grayscale gate; 10 blur
        gate; 11 sigma (scaled onto [0.1, 2.0]). All columns are drawn whatever the
        configuration, so the generator advances the same way for every config."""
        if batch_size < 0:
            raise ValueError(f"BatchColorAugment.draw: batch_size must be >= 0, got {batch_size}")
        _check_generator(generator, device)
        u = torch.rand(
            (batch_size, N_DRAWS), generator=generator, device=generator.device if device is None else device
        )
        order = torch.argsort(u[:, _ORDER : _ORDER + 4], dim=1, stable=True)
        factors = [lo + (hi - lo) * u[:, _FACTORS + k] for k, (lo, hi) in enumerate(self.ranges)]
        lo_s, hi_s = SIGMA_RANGE
        return ColorParams(
            jitter=u[:, _JITTER] < self.jitter_prob,
            order=order,
            brightness=factors[BRIGHTNESS],
            contrast=factors[CONTRAST],
            saturation=factors[SATURATION],
            hue=factors[HUE],
            grayscale=u[:, _GRAY] < self.grayscale_prob,
            blur=u[:, _BLUR] < self.blur_prob,
            sigma=lo_s + (hi_s - lo_s) * u[:, _SIGMA],
        )

    def apply(self, x: torch.Tensor, params: ColorParams) -> torch.Tensor:
        """Apply drawn parameters to a batch (see the class docstring for ``x``)."""
        self._check_input(x)
        b, c = x.shape[0], x.shape[1]
        if params.batch_size != b:
            raise ValueError(f"BatchColorAugment: params are for {params.batch_size} samples, x has {b}")
        if params.jitter.device != x.device:
            raise ValueError(f"BatchColorAugment: params are on {params.jitter.device}, x on {x.device}")
        mean, std = self._normalization(x.device, c)
        if x.dtype == torch.uint8:  # as v2.ToDtype(torch.float32, scale=True)
            img = x.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255)
        else:
            img = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        rounds, gray, blur = self._groups(params, c)
        for r in range(4):  # round r: each jittered sample applies its op order[:, r]
            for op, idx in enumerate(rounds[r]):
                if idx is not None:
                    factor = params.factor(op).index_select(0, idx)
                    img.index_copy_(0, idx, _OPS[op](img.index_select(0, idx), factor))
        if gray is not None:
            img.index_copy_(0, gray, _luma(img.index_select(0, gray)).expand(-1, c, -1, -1))
        if blur is not None:
            img.index_copy_(
                0, blur, gaussian_blur(img.index_select(0, blur), self.kernel_size, params.sigma.index_select(0, blur))
            )
        out = torch.empty_like(x, dtype=torch.float32)  # x's memory format
        return torch.sub(img, mean, out=out).div_(std)

    def _groups(
        self, params: ColorParams, c: int
    ) -> tuple[list[list[torch.Tensor | None]], torch.Tensor | None, torch.Tensor | None]:
        """Sample indices per (round, op), then of the grayscale and blurred samples, with
        one host sync: row r < 4 keys each sample by its op in round r (4: not
        jittered), row 4 by grayscale (0: yes, 4: no), row 5 by blur; a stable sort per
        row groups the samples by key and one transfer of the counts splits them. None
        for an empty group or a skipped op."""
        none = torch.full_like(params.order[:, 0], 4)
        rows = [torch.where(params.jitter, params.order[:, r], none) for r in range(4)]
        rows += [torch.where(params.grayscale, 0, none), torch.where(params.blur, 0, none)]
        keys = torch.stack(rows)  # [6, B]
        sorted_idx = torch.argsort(keys, dim=1, stable=True)
        counts: list[list[int]] = (keys.unsqueeze(-1) == torch.arange(5, device=keys.device)).sum(dim=1).tolist()
        parts = [torch.split(sorted_idx[row], counts[row]) for row in range(6)]
        # one-channel images: saturation, hue and grayscale leave them unchanged (torchvision)
        skip = [not self.active[op] or (c == 1 and op in (SATURATION, HUE)) for op in range(4)]
        rounds = [[None if skip[op] or counts[r][op] == 0 else parts[r][op] for op in range(4)] for r in range(4)]
        gray = None if c == 1 or counts[4][0] == 0 else parts[4][0]
        blur = None if counts[5][0] == 0 else parts[5][0]
        return rounds, gray, blur

    def _normalization(self, device: torch.device, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.mean) not in (1, c) or len(self.std) not in (1, c):
            raise ValueError(
                f"BatchColorAugment: mean/std have {len(self.mean)}/{len(self.std)} values, the input has {c} channels"
            )
        if device not in self._stats:
            self._stats[device] = (
                torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
                torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1),
            )
        return self._stats[device]

    @staticmethod
    def _check_input(x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"BatchColorAugment: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"BatchColorAugment: x must be [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] not in (1, 3):
            raise ValueError(f"BatchColorAugment: x must have 1 or 3 channels, got {x.shape[1]}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(f"BatchColorAugment: x must be uint8 (0..255) or float (0..1), got {x.dtype}")


def _check_generator(generator: torch.Generator, device: torch.device | str | None) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"BatchColorAugment: generator must be a torch.Generator, got {type(generator).__name__}")
    g = generator.device
    if device is None:
        return
    device = torch.device(device)
    if g.type != device.type or (g.index is not None and device.index is not None and g.index != device.index):
        raise ValueError(f"BatchColorAugment: generator is on {g}, the batch on {device}")


class DeviceViews:
    """The colour part of a view transform made with ``color=False``, for each view of a
    batch on the device: one :class:`BatchColorAugment` per view side (multi-crop's local
    views get their own blur kernel, as on the CPU path), all drawing from one generator.

    The training loop seeds the generator from (seed, rank, step), so a resumed run draws
    the same colours for the same step.
    """

    def __init__(self, **color: float) -> None:
        self.color = color  # BatchColorAugment's keyword arguments
        self._by_size: dict[int, BatchColorAugment] = {}

    def __call__(self, views: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        out = []
        for v in views:
            side = int(v.shape[-1])
            if side not in self._by_size:
                self._by_size[side] = BatchColorAugment(side, **self.color)  # type: ignore[arg-type]
            out.append(self._by_size[side](v, generator))
        return out

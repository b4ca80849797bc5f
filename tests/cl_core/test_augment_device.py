"""BatchColorAugment: each per-sample op against torchvision.transforms.v2.functional,
per-sample independence, gate probabilities, jitter order, determinism, input formats,
errors; CPU only except the CUDA agreement test."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cl_core.augment import IMAGENET_MEAN, IMAGENET_STD
from cl_core.augment_device import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    N_DRAWS,
    OP_NAMES,
    SATURATION,
    BatchColorAugment,
    ColorParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    hsv_to_rgb,
    rgb_to_hsv,
)

BATCH_OPS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation, HUE: adjust_hue}
TV_OPS = {
    BRIGHTNESS: TF.adjust_brightness,
    CONTRAST: TF.adjust_contrast,
    SATURATION: TF.adjust_saturation,
    HUE: TF.adjust_hue,
}
TOL = {BRIGHTNESS: 1e-6, CONTRAST: 1e-6, SATURATION: 1e-6, HUE: 1e-5}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    """uint8 images with flat patches (grey and saturated pixels, ties between channels)
    as well as noise, so every branch of the HSV conversion is hit."""
    x = torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=gen(seed))
    x[:, :, :2, :2] = 128  # grey: max == min
    if c == 3:
        x[:, 0, 2:4, 2:4] = x[:, 1, 2:4, 2:4]  # r == g
        x[:, :, 4:6, 4:6] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    return x


def to_float(x: torch.Tensor) -> torch.Tensor:
    return TF.to_dtype(x, torch.float32, scale=True)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    return TF.normalize(x, mean=list(mean), std=list(std))


def reference(aug: BatchColorAugment, x: torch.Tensor, p: ColorParams) -> torch.Tensor:
    """The per-sample chain with torchvision's functional ops, in each sample's order."""
    out = []
    c = x.shape[1]
    k = aug.kernel_size
    for i in range(x.shape[0]):
        img = to_float(x[i])
        if p.jitter[i]:
            for op in p.order[i].tolist():
                if aug.active[op]:
                    img = TV_OPS[op](img, p.factor(op)[i].item())
        if p.grayscale[i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=c)
        if p.blur[i]:
            s = p.sigma[i].item()
            img = TF.gaussian_blur(img, [k, k], [s, s])
        out.append(normalize(img, aug.mean, aug.std))
    return torch.stack(out)


# --- each op against torchvision, per sample, with the drawn parameters


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("op", [BRIGHTNESS, CONTRAST, SATURATION, HUE], ids=OP_NAMES)
def test_op_matches_torchvision(op: int, c: int) -> None:
    aug = BatchColorAugment(16, jitter_strength=1.0)
    x = to_float(images(24, c))
    p = aug.draw(24, gen(1))
    f = p.factor(op)
    lo, hi = aug.ranges[op]
    assert bool(((f >= lo) & (f <= hi)).all())
    got = BATCH_OPS[op](x, f)
    want = torch.stack([TV_OPS[op](x[i], f[i].item()) for i in range(len(x))])
    torch.testing.assert_close(got, want, atol=TOL[op], rtol=0)


def test_grayscale_matches_torchvision() -> None:
    aug = BatchColorAugment(16, jitter_prob=0.0, grayscale_prob=1.0)
    x = images(8)
    got = aug(x, gen())
    want = torch.stack([normalize(TF.rgb_to_grayscale(to_float(x[i]), num_output_channels=3)) for i in range(8)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("image_size", "c"), [(16, 3), (64, 1), (224, 3)])
def test_blur_matches_torchvision(image_size: int, c: int) -> None:
    aug = BatchColorAugment(image_size, blur_prob=1.0)
    assert aug.kernel_size == max(3, int(0.1 * image_size) // 2 * 2 + 1)
    k = aug.kernel_size
    x = to_float(images(6, c, size=max(16, k)))
    p = aug.draw(6, gen(2))
    assert bool(((p.sigma >= 0.1) & (p.sigma <= 2.0)).all())
    got = gaussian_blur(x, k, p.sigma)
    want = torch.stack([TF.gaussian_blur(x[i], [k, k], [p.sigma[i].item()] * 2) for i in range(6)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_hsv_round_trip() -> None:
    x = to_float(images(4))
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-6, rtol=0)
    hsv = rgb_to_hsv(x)
    assert float(hsv.min()) >= 0.0 and float(hsv.max()) <= 1.0


@pytest.mark.parametrize("c", [1, 3])
def test_full_pipeline_matches_reference_chain(c: int) -> None:
    """All ops on, each gate at 0.5: every sample equals torchvision's chain in its order."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else ((0.5,), (0.25,))
    aug = BatchColorAugment(16, jitter_prob=0.5, grayscale_prob=0.5, blur_prob=0.5, mean=mean, std=std)
    x = images(48, c)
    p = aug.draw(48, gen(3))
    assert 0 < int(p.jitter.sum()) < 48 and 0 < int(p.grayscale.sum()) < 48 and 0 < int(p.blur.sum()) < 48
    torch.testing.assert_close(aug.apply(x, p), reference(aug, x, p), atol=1e-4, rtol=0)
    torch.testing.assert_close(aug(x, gen(3)), aug.apply(x, p), atol=0, rtol=0)  # __call__ = draw + apply


def test_paper_strength_and_zero_strength() -> None:
    """s = 0.5 and s = 0 (every range a point: jitter skipped, images unchanged)."""
    x = images(16)
    aug = BatchColorAugment(16, jitter_strength=0.5, jitter_prob=1.0, grayscale_prob=0.0)
    assert aug.ranges[0] == pytest.approx((0.6, 1.4)) and aug.ranges[3] == pytest.approx((-0.1, 0.1))
    p = aug.draw(16, gen(4))
    torch.testing.assert_close(aug.apply(x, p), reference(aug, x, p), atol=1e-4, rtol=0)
    still = BatchColorAugment(16, jitter_strength=0.0, jitter_prob=1.0, grayscale_prob=0.0)
    assert still.active == (False, False, False, False)
    assert torch.equal(still(x, gen(4)), normalize(to_float(x)))
    strong = BatchColorAugment(16, jitter_strength=2.0)  # brightness etc. from 0 (clipped), hue +-0.4
    assert strong.ranges[0] == (0.0, pytest.approx(2.6)) and strong.ranges[3] == pytest.approx((-0.4, 0.4))


# --- randomness: independence, probabilities, order, determinism


def test_per_sample_independence() -> None:
    aug = BatchColorAugment(16, jitter_prob=1.0, grayscale_prob=0.0)
    x = images(1).expand(32, -1, -1, -1).contiguous()
    out = aug(x, gen(5)).flatten(1)
    assert len({tuple(row.tolist()) for row in out}) == 32
    assert int(aug.draw(32, gen(5)).brightness.unique().numel()) == 32


def test_gate_probabilities_and_pass_through() -> None:
    """Gate fractions over 4096 samples within 4 standard deviations; samples whose gate is
    off come through that op bit for bit (here: only the jitter gate or only the blur gate
    is active, so they equal the normalised input)."""
    n = 4096
    x = images(n, size=4, seed=6)
    base = normalize(to_float(x))
    probs = {"jitter": 0.8, "grayscale": 0.2, "blur": 0.5}
    aug = BatchColorAugment(4, jitter_prob=probs["jitter"], grayscale_prob=probs["grayscale"], blur_prob=probs["blur"])
    p = aug.draw(n, gen(7))
    for name, prob in probs.items():
        frac = float(getattr(p, name).float().mean())
        assert abs(frac - prob) < 4 * math.sqrt(prob * (1 - prob) / n), (name, frac)
    for only in ("jitter", "grayscale", "blur"):
        single = BatchColorAugment(4, **{f"{k}_prob": (v if k == only else 0.0) for k, v in probs.items()})
        q = single.draw(n, gen(8))
        out = single.apply(x, q)
        gate = getattr(q, only)
        assert torch.equal(out[~gate], base[~gate])
        changed = (out != base).flatten(1).any(dim=1)
        assert float(changed[gate].float().mean()) > 0.95, only  # applied ops change the image
        assert not bool((changed & ~gate).any())


def test_jitter_order_is_a_uniform_permutation() -> None:
    n = 4096
    aug = BatchColorAugment(4, jitter_prob=1.0)
    p = aug.draw(n, gen(9))
    assert p.order.dtype == torch.long and p.order.shape == (n, 4)
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    counts: dict[tuple[int, ...], int] = {}
    for row in p.order.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert set(counts) == set(itertools.permutations(range(4)))
    expected = n / 24
    assert all(abs(v - expected) < 5 * math.sqrt(expected) for v in counts.values()), counts


def test_order_matters_and_is_followed() -> None:
    """Same factors, ops applied in the drawn order vs a fixed order: results differ, and the
    drawn order matches torchvision's chain in that order (reference)."""
    aug = BatchColorAugment(16, jitter_prob=1.0, grayscale_prob=0.0)
    x = images(32)
    p = aug.draw(32, gen(10))
    fixed = ColorParams(**{**p.__dict__, "order": torch.arange(4).expand(32, 4).clone()})
    got, got_fixed = aug.apply(x, p), aug.apply(x, fixed)
    torch.testing.assert_close(got, reference(aug, x, p), atol=1e-4, rtol=0)
    torch.testing.assert_close(got_fixed, reference(aug, x, fixed), atol=1e-4, rtol=0)
    reordered = (p.order != torch.arange(4)).any(dim=1)
    assert bool(reordered.any())
    differs = (got - got_fixed).abs().flatten(1).amax(dim=1) > 1e-3
    assert float(differs[reordered].float().mean()) > 0.8  # some swaps commute (no clamping hit)
    assert not bool(differs[~reordered].any())


def test_draw_layout() -> None:
    """The documented draws: one rand((B, 12)) from the generator, columns as in draw()."""
    aug = BatchColorAugment(16, jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5)
    p = aug.draw(64, gen(11))
    u = torch.rand((64, N_DRAWS), generator=gen(11))
    assert torch.equal(p.jitter, u[:, 0] < 0.8)
    assert torch.equal(p.order, u[:, 1:5].argsort(dim=1, stable=True))
    for op in range(4):
        lo, hi = aug.ranges[op]
        torch.testing.assert_close(p.factor(op), lo + (hi - lo) * u[:, 5 + op], atol=0, rtol=0)
    assert torch.equal(p.grayscale, u[:, 9] < 0.2) and torch.equal(p.blur, u[:, 10] < 0.5)
    torch.testing.assert_close(p.sigma, 0.1 + 1.9 * u[:, 11], atol=0, rtol=0)
    g = gen(11)
    aug(images(64), g)  # the call advances the generator by exactly that draw
    g2 = gen(11)
    torch.rand((64, N_DRAWS), generator=g2)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=g2))


def test_determinism() -> None:
    aug = BatchColorAugment(16, blur_prob=0.5)
    x = images(32)
    torch.manual_seed(0)
    a = aug(x, gen(12))
    torch.manual_seed(1)  # the global generator plays no part
    b = aug(x, gen(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, gen(13)))


def test_same_distribution_as_cpu_path() -> None:
    """One image, 1500 views each way: the colour part of SimCLRTransform (uint8, global
    generator) and the batched module (float) agree on the per-view channel means and
    standard deviations to within 5 standard errors."""
    n = 1500
    x = images(1, size=8, seed=18).expand(n, -1, -1, -1).contiguous()
    s = 1.0
    cpu = v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        ]
    )
    torch.manual_seed(0)
    a = torch.stack([cpu(tv_tensors.Image(x[i])) for i in range(n)])
    b = BatchColorAugment(8, jitter_strength=s, blur_prob=0.5)(x, gen(18))
    for stat in (lambda t: t.mean(dim=(2, 3)), lambda t: t.std(dim=(2, 3))):
        sa, sb = stat(a), stat(b)
        z = (sa.mean(0) - sb.mean(0)) / ((sa.var(0) + sb.var(0)) / n).sqrt()
        assert bool((z.abs() < 5).all()), z


# --- input formats and normalisation


def test_uint8_equals_float_input() -> None:
    aug = BatchColorAugment(16, blur_prob=0.5)
    x = images(32)
    out = aug(x, gen(14))
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, aug(to_float(x), gen(14)))  # ToDtype's scaling: exact
    torch.testing.assert_close(out, aug(x.float() / 255, gen(14)), atol=1e-4, rtol=0)
    torch.testing.assert_close(out, aug(x.double() / 255, gen(14)), atol=1e-4, rtol=0)
    assert torch.equal(x, images(32))  # input untouched
    xf = to_float(x)
    aug(xf, gen(14))
    assert torch.equal(xf, to_float(x))


def test_identity_config_is_normalisation() -> None:
    aug = BatchColorAugment(16, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    x = images(8)
    out = aug(x, gen())
    assert torch.equal(out, normalize(to_float(x)))  # v2.ToDtype(scale=True) + v2.Normalize, exactly
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x / 255 - mean) / std, atol=1e-6, rtol=0)  # within float rounding


def test_channels_last_preserved() -> None:
    aug = BatchColorAugment(16, blur_prob=0.5)
    x = images(16)
    xcl = x.contiguous(memory_format=torch.channels_last)
    out = aug(xcl, gen(15))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.equal(out, aug(x, gen(15)))
    out_c = aug(x, gen(15))
    assert out_c.is_contiguous()


def test_one_channel() -> None:
    aug = BatchColorAugment(16, jitter_prob=1.0, grayscale_prob=0.5, blur_prob=0.5, mean=(0.5,), std=(0.25,))
    x = images(16, c=1)
    p = aug.draw(16, gen(16))
    out = aug.apply(x, p)
    assert out.shape == (16, 1, 16, 16)
    torch.testing.assert_close(out, reference(aug, x, p), atol=1e-5, rtol=0)
    one_value = BatchColorAugment(16, mean=(0.5,), std=(0.25,))
    assert one_value(images(4), gen()).shape == (4, 3, 16, 16)  # one value broadcasts over 3 channels


def test_empty_batch() -> None:
    out = BatchColorAugment(16, blur_prob=0.5)(images(0), gen())
    assert out.shape == (0, 3, 16, 16)


# --- errors


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"jitter_prob": 1.5}, "jitter_prob"),
        ({"jitter_prob": -0.1}, "jitter_prob"),
        ({"grayscale_prob": 2}, "grayscale_prob"),
        ({"blur_prob": -1.0}, "blur_prob"),
        ({"blur_prob": float("nan")}, "blur_prob"),
        ({"jitter_strength": -1.0}, "jitter_strength"),
        ({"jitter_strength": 3.0}, "jitter_strength"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
    ],
)
def test_bad_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BatchColorAugment(32, **kwargs)


@pytest.mark.parametrize("image_size", [0, -3, 2.5])
def test_bad_image_size(image_size) -> None:
    with pytest.raises(ValueError, match="image_size"):
        BatchColorAugment(image_size)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(3, 8, 8, dtype=torch.uint8), r"\[B, C, H, W\]"),
        (torch.zeros(2, 4, 8, 8, dtype=torch.uint8), "1 or 3 channels"),
        (torch.zeros(2, 2, 8, 8), "1 or 3 channels"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int32), "uint8"),
    ],
)
def test_bad_input(x: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BatchColorAugment(8)(x, gen())


def test_bad_call() -> None:
    aug = BatchColorAugment(8)
    with pytest.raises(ValueError, match="generator"):
        aug(images(2, size=8), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mean"):
        aug(images(2, c=1, size=8), gen())  # three-value ImageNet stats on one channel
    with pytest.raises(ValueError, match="params are for 3 samples"):
        aug.apply(images(2, size=8), aug.draw(3, gen()))
    with pytest.raises(ValueError, match="batch_size"):
        aug.draw(-1, gen())


# --- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    aug = BatchColorAugment(32, jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5)
    x = images(64, size=32)
    p = aug.draw(64, gen(17))
    cpu = aug.apply(x, p)
    xc = x.cuda().contiguous(memory_format=torch.channels_last)
    gpu = aug.apply(xc, p.to("cuda"))
    assert gpu.device.type == "cuda" and gpu.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    g = torch.Generator(device="cuda")
    out = aug(xc, g.manual_seed(0))
    assert torch.equal(out, aug(xc, g.manual_seed(0)))
    with pytest.raises(ValueError, match="generator"):
        aug(xc, gen())

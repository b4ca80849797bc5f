"""CMC: the Lab conversion, the channel split, the cross-view InfoNCE (in-batch and
memory bank) against loop references, and two gloo processes against one."""

from __future__ import annotations

import math
from typing import Any, TypeVar

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cl_core.augment import IMAGENET_MEAN, IMAGENET_STD
from cl_core.losses.multiview_nce import CrossViewInfoNCE, bank_infonce
from cl_core.methods import get_method
from cl_core.methods.cmc import CMC
from cl_core.models.color import LAB_RANGE, NormalizedRGBToLab, rgb_to_lab, scale_lab
from tests.gloo import run_workers

SMALL: dict[str, Any] = {"backbone": "small_cnn", "backbone_args": {"width": 4}, "proj_dim": 6}


def _normalize(rgb: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (rgb - mean) / std


def _images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return _normalize(torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)))


# ---- RGB -> Lab --------------------------------------------------------------------------


def _lab_slow(r: float, g: float, b: float) -> tuple[float, float, float]:
    """One pixel, plain Python: sRGB -> linear -> XYZ (D65) -> CIELAB."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    rl, gl, bl = linear(r), linear(g), linear(b)
    x = 0.4124564 * rl + 0.3575761 * gl + 0.1804375 * bl
    y = 0.2126729 * rl + 0.7151522 * gl + 0.0721750 * bl
    z = 0.0193339 * rl + 0.1191920 * gl + 0.9503041 * bl
    d = 6 / 29

    def f(t: float) -> float:
        return t ** (1 / 3) if t > d**3 else t / (3 * d * d) + 4 / 29

    fx, fy, fz = f(x / 0.95047), f(y / 1.0), f(z / 1.08883)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


@pytest.mark.parametrize(
    ("rgb", "lab"),
    [
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20)),
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        ((0.0, 1.0, 0.0), (87.73, -86.18, 83.18)),
        ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86)),
        ((0.5, 0.5, 0.5), (53.39, 0.0, 0.0)),  # mid grey: a = b = 0
    ],
)
def test_rgb_to_lab_reference_values(rgb, lab):
    out = rgb_to_lab(torch.tensor(rgb).view(1, 3, 1, 1)).view(3)
    torch.testing.assert_close(out, torch.tensor(lab), atol=0.01, rtol=0)


def test_rgb_to_lab_matches_a_per_pixel_python_implementation():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    rgb[0, :, 0, 0] = 0.02  # the linear segment of the sRGB curve and of CIELAB's f
    rgb[0, :, 0, 1] = torch.tensor([0.0, 0.01, 0.03])
    out = rgb_to_lab(rgb)
    assert out.dtype == torch.float32 and out.shape == rgb.shape
    ref = torch.empty_like(out)
    for n in range(2):
        for i in range(4):
            for j in range(5):
                ref[n, :, i, j] = torch.tensor(_lab_slow(*(float(v) for v in rgb[n, :, i, j])))
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=0)


def test_scaled_lab_spans_minus_one_to_one_over_the_srgb_gamut():
    corners = torch.tensor([[r, g, b] for r in (0, 1) for g in (0, 1) for b in (0, 1)], dtype=torch.float32)
    s = scale_lab(rgb_to_lab(corners.view(8, 3, 1, 1))).view(8, 3)
    torch.testing.assert_close(s.min(0).values, torch.full((3,), -1.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(s.max(0).values, torch.full((3,), 1.0), atol=1e-4, rtol=0)
    assert LAB_RANGE[0] == (0.0, 100.0)


def test_normalized_rgb_to_lab_undoes_the_imagenet_normalisation_and_clamps():
    rgb = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(NormalizedRGBToLab()(_normalize(rgb)), scale_lab(rgb_to_lab(rgb)), atol=1e-4, rtol=0)
    far = NormalizedRGBToLab()(torch.full((1, 3, 1, 1), 50.0))  # far above white: clamped to white
    torch.testing.assert_close(far.view(3), scale_lab(rgb_to_lab(torch.ones(1, 3, 1, 1))).view(3))
    assert NormalizedRGBToLab().state_dict() == {}  # constants, not state


# ---- construction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "split",
    [
        [[0]],  # one group
        [],
        [[0], []],  # empty group
        [[0], [0, 1]],  # overlap
        [[0], [3]],  # out of range
        [[0], [-1]],
        [[0], [1.0]],
        [[0], [True]],
        "L,ab",
        [0, 1],  # not lists
    ],
)
def test_channel_split_validation(split):
    with pytest.raises(ValueError, match="channel_split"):
        CMC(channel_split=split, **SMALL)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"objective": "nce"}, "objective"),
        ({"temperature": 0.0}, "temperature"),
        ({"proj_dim": 0}, "proj_dim"),
        ({"num_negatives": 0}, "num_negatives"),
        ({"bank_momentum": 1.0}, "bank_momentum"),
        ({"objective": "memory_bank"}, "num_samples"),  # the bank needs the split's size
    ],
)
def test_hyperparameter_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CMC(**{**SMALL, **kwargs})


def test_encoders_per_group_and_the_encoder_module():
    m = CMC(channel_split=[[1, 2], [0]], **{**SMALL, "backbone_args": {"width": 4, "in_channels": 3}})
    assert [enc.features[0].in_channels for enc in m.backbone.encoders] == [2, 1]  # in_channels overridden
    assert m.feat_dim == 2 * 16 and not m.needs_index and not CMC.needs_index
    assert get_method("cmc") is CMC and CMC.view_kind == "single"
    x = _images(3)
    m.eval()
    feats = m.encoder()(x)
    assert feats.shape == (3, m.feat_dim)
    lab = NormalizedRGBToLab()(x)
    torch.testing.assert_close(feats[:, :16], m.backbone.encoders[0](lab[:, [1, 2]]))
    torch.testing.assert_close(feats[:, 16:], m.backbone.encoders[1](lab[:, [0]]))


# ---- in-batch loss -----------------------------------------------------------------------


def _cross_view_loop(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    total = 0.0
    for i in range(a.shape[0]):
        scores = [float(a[i] @ b[j]) / t for j in range(b.shape[0])]
        total += -(scores[i] - math.log(sum(math.exp(s) for s in scores)))
    return torch.tensor(total / a.shape[0])


def test_cross_view_infonce_matches_loop():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    b = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    loss, acc = CrossViewInfoNCE(0.2, gather_distributed=False)(a, b)
    torch.testing.assert_close(loss, _cross_view_loop(a, b, 0.2), rtol=1e-5, atol=1e-6)
    assert 0 <= float(acc) <= 1


@pytest.mark.parametrize("split", [[[0], [1, 2]], [[0], [1], [2]]])
def test_in_batch_loss_is_the_sum_over_both_directions_of_every_pair(split):
    torch.manual_seed(0)
    m = CMC(channel_split=split, temperature=0.1, gather_distributed=False, **SMALL).eval()
    x = _images(5)
    out = m([x])
    z = m.embed(x)
    pairs = [(i, j) for i in range(len(split)) for j in range(len(split)) if i != j]
    ref = sum(_cross_view_loop(z[i].detach(), z[j].detach(), 0.1) for i, j in pairs)
    torch.testing.assert_close(out.loss.detach(), ref, rtol=1e-5, atol=1e-5)
    for i, j in pairs:
        torch.testing.assert_close(
            out.metrics[f"train/loss_v{i}_v{j}"],
            _cross_view_loop(z[i].detach(), z[j].detach(), 0.1),
            rtol=1e-5,
            atol=1e-5,
        )
    assert set(out.metrics) >= {"train/loss", "train/acc", "train/z_std"}


# ---- memory bank -------------------------------------------------------------------------


def _bank_model(num_samples: int = 20, **kw) -> CMC:
    torch.manual_seed(0)
    return CMC(
        objective="memory_bank",
        num_samples=num_samples,
        num_negatives=7,
        temperature=0.1,
        gather_distributed=False,
        **SMALL,
        **kw,
    )


def test_bank_loss_matches_loop_and_updates_only_the_batch_rows():
    m = _bank_model()
    assert m.needs_index and not CMC.needs_index  # the instance says so; the engine reads the instance
    index = torch.tensor([3, 7, 11, 0])
    x = _images(4)
    before = [b.bank.clone() for b in m.banks]
    torch.manual_seed(5)
    out = m([x], index=index)
    torch.manual_seed(5)
    neg_idx = torch.randint(0, 20, (4, 7))  # the method's only random draw
    z = [v.detach() for v in m.embed(x)]  # train mode again: the same batch statistics as in forward
    ref = 0.0
    for i, j in [(0, 1), (1, 0)]:
        for a in range(4):
            scores = [float(z[i][a] @ before[j][index[a]]) / 0.1] + [
                float(z[i][a] @ before[j][k]) / 0.1 for k in neg_idx[a]
            ]
            ref += -(scores[0] - math.log(sum(math.exp(s) for s in scores))) / 4
    torch.testing.assert_close(out.loss.detach(), torch.tensor(ref), rtol=1e-5, atol=1e-5)
    others = torch.ones(20, dtype=torch.bool)
    others[index] = False
    for v, bank in enumerate(m.banks):
        torch.testing.assert_close(bank.bank[others], before[v][others], rtol=0, atol=0)  # untouched
        torch.testing.assert_close(bank.bank[index], F.normalize(0.5 * before[v][index] + 0.5 * z[v], dim=1))


def test_bank_in_eval_mode_is_read_only_and_index_is_checked():
    m = _bank_model().eval()
    before = m.state_dict()["banks.0.bank"].clone()
    m([_images(4)], index=torch.arange(4))
    torch.testing.assert_close(m.banks[0].bank, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="index"):
        m([_images(4)])
    with pytest.raises(ValueError, match="bank"):
        m([_images(4)], index=torch.tensor([0, 1, 2, 20]))


def test_bank_variant_smoke_step_and_resume_state():
    m = _bank_model(num_samples=64)
    opt = torch.optim.SGD(m.param_groups(1e-4), lr=0.05)
    batch = CMC.example_batch(8, 16)
    out = m(batch["views"], index=torch.arange(8) * 3)
    assert torch.isfinite(out.loss) and out.loss.dim() == 0
    opt.zero_grad()
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    opt.step()
    state = m.state_dict()
    assert {"banks.0.bank", "banks.1.bank"} <= set(state)
    fresh = _bank_model(num_samples=64)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.banks[1].bank, m.banks[1].bank)


def test_bank_infonce_positive_first():
    a = F.normalize(torch.randn(3, 4), dim=1)
    loss, acc = bank_infonce(a, a, -a.unsqueeze(1).expand(3, 5, 4), 0.1)  # positive = itself, negatives opposite
    assert float(loss) < 1e-6 and float(acc) == 1.0


# ---- two gloo processes ------------------------------------------------------------------

B, WORLD, NUM = 3, 2, 16


M = TypeVar("M", bound=nn.Module)


def _bn_eval(m: M) -> M:
    """Train mode with batch norm on its running statistics: every sample's features are
    then independent of the batch, so a split batch gives the same features."""
    m.train()
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()
    return m


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad.clone()


def _in_batch_model() -> CMC:
    torch.manual_seed(0)
    return CMC(temperature=0.2, **SMALL)


def _bank_model_dist() -> CMC:
    torch.manual_seed(0)
    return CMC(objective="memory_bank", num_samples=NUM, num_negatives=5, **SMALL)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    return _images(WORLD * B, seed=3), torch.tensor([5, 0, 9, 14, 2, 11])


def _worker(rank: int, world: int) -> dict:
    x, index = _data()
    sl = slice(rank * B, (rank + 1) * B)
    method = _bn_eval(_in_batch_model())
    model = nn.parallel.DistributedDataParallel(method)
    loss = model([x[sl]]).loss
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    bank = _bn_eval(_bank_model_dist())
    bank([x[sl]], index=index[sl])
    return {
        "loss": (mean_loss / world).item(),
        "grads": [_grad(p) for p in method.parameters()],
        "banks": [bank._bank(v).bank.clone() for v in range(2)],
    }


def test_two_gloo_processes_equal_one_process_with_the_global_batch():
    x, index = _data()
    ref = _bn_eval(_in_batch_model())
    loss = ref([x]).loss
    loss.backward()
    bank = _bn_eval(_bank_model_dist())
    init = [b.bank.clone() for b in bank.banks]
    bank([x], index=index)
    results = run_workers(_worker, WORLD)
    for rank in range(WORLD):
        assert results[rank]["loss"] == pytest.approx(loss.item(), rel=1e-5)
        for g, p in zip(results[rank]["grads"], ref.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
        for got, want, first in zip(results[rank]["banks"], bank.banks, init, strict=True):
            torch.testing.assert_close(got, want.bank, rtol=1e-5, atol=1e-6)  # every worker wrote the whole batch
            assert not torch.allclose(got[index], first[index])

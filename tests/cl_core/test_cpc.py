"""CPC v2: the patch grid, the causality of both context networks, the grid InfoNCE
against a loop reference, and two gloo processes against one."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cl_core.losses.cpc_infonce import GridInfoNCE
from cl_core.methods import get_method
from cl_core.methods.cpc import CPC
from cl_core.models.patches import (
    GRUContext,
    MaskedConvContext,
    batchnorm_to_layernorm,
    default_patch,
    extract_patches,
    grid_shape,
)
from tests.gloo import run_workers

SMALL: dict[str, Any] = {
    "backbone": "small_cnn",
    "backbone_args": {"width": 4},
    "context_layers": 2,
    "context_dim": 6,
    "target_dim": 5,
}


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- patch grid --------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w", "p", "s"), [(16, 12, 4, 2), (15, 16, 4, 2), (8, 8, 4, 4), (9, 7, 3, 1)])
def test_patch_grid_shapes_and_contents(h, w, p, s):
    x = torch.randn(2, 3, h, w)
    patches = extract_patches(x, p, s)
    r, q = grid_shape(h, w, p, s)
    assert (r, q) == ((h - p) // s + 1, (w - p) // s + 1)
    assert patches.shape == (2, r, q, 3, p, p)
    for n in range(2):
        for i in range(r):
            for j in range(q):
                assert torch.equal(patches[n, i, j], x[n, :, i * s : i * s + p, j * s : j * s + p])


def test_default_patches_keep_cpcs_proportions():
    assert default_patch(256, None, None) == (64, 32)  # the paper's 64 px every 32 px
    assert default_patch(32, None, None) == (8, 4)
    assert default_patch(16, None, None) == (4, 2)
    assert default_patch(16, 6, None) == (6, 3)
    for side in (16, 32, 256):
        p, s = default_patch(side, None, None)
        assert grid_shape(side, side, p, s) == (7, 7)
    with pytest.raises(ValueError, match="patch_size"):
        default_patch(8, 9, None)


def test_encoder_is_the_mean_over_the_patch_grid():
    torch.manual_seed(0)
    m = CPC(**SMALL).eval()
    x = _images(3)
    feats = m.encoder()(x)
    assert feats.shape == (3, m.feat_dim)
    z = m.patch_embeddings(x)
    assert z.shape == (3, 7, 7, m.feat_dim)
    torch.testing.assert_close(feats, z.mean(dim=(1, 2)))
    torch.testing.assert_close(z[1, 2, 5], m.backbone(x[1:2, :, 4:8, 10:14])[0])  # patch (2, 5): rows 4-7, cols 10-13


def test_layer_norm_replaces_batch_norm_in_the_patch_encoder():
    torch.manual_seed(0)
    layer, batch = CPC(**SMALL), CPC(**SMALL, patch_norm="batch")
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in layer.backbone.modules())
    assert sum(isinstance(mod, nn.GroupNorm) and mod.num_groups == 1 for mod in layer.backbone.modules()) == 4
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in batch.backbone.modules())
    seq = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, affine=False))
    assert isinstance(batchnorm_to_layernorm(seq)[1], nn.GroupNorm) and not seq[1].affine


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"context": "lstm"}, "context"),
        ({"patch_norm": "group"}, "patch_norm"),
        ({"min_offset": 0}, "min_offset"),
        ({"min_offset": 3, "max_offset": 2}, "max_offset"),
        ({"directions": 4}, "directions"),
        ({"emb_scale": -1.0}, "emb_scale"),
        ({"patch_size": 0}, "patch_size"),
        ({"context_dim": 0}, "context_dim"),
    ],
)
def test_hyperparameter_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CPC(**{**SMALL, **kwargs})


def test_offsets_must_fit_the_grid():
    m = CPC(**SMALL, patch_size=8, patch_stride=4)  # 16 px: a 3 x 3 grid, offset 3 does not fit
    with pytest.raises(ValueError, match="max_offset"):
        m([_images(2)])
    assert get_method("cpc") is CPC and CPC.view_kind == "single"


# ---- causality of the context networks ---------------------------------------------------


def _context(kind: str) -> nn.Module:
    torch.manual_seed(0)
    net = MaskedConvContext(4, hidden=6, layers=3) if kind == "masked_conv" else GRUContext(4, hidden=6)
    for p in net.parameters():  # non-trivial biases too
        nn.init.normal_(p, std=0.5)
    return net


@pytest.mark.parametrize("kind", ["masked_conv", "gru"])
def test_context_at_a_row_never_sees_the_rows_below(kind):
    net = _context(kind)
    z = torch.randn(2, 4, 6, 5)
    rows = z.shape[2]
    for i in range(rows):
        # exact receptive field: the gradient of the contexts at row i w.r.t. rows below is zero ...
        zg = z.clone().requires_grad_(True)
        net(zg)[:, :, i].pow(2).sum().backward()
        assert torch.count_nonzero(zg.grad[:, :, i + 1 :]) == 0
        assert torch.count_nonzero(zg.grad[:, :, i]) > 0  # ... and it does see its own row
        if i > 0:
            assert torch.count_nonzero(zg.grad[:, :, i - 1]) > 0  # and the row above
        # changing everything below row i changes nothing at rows <= i
        z2 = z.clone()
        z2[:, :, i + 1 :] = torch.randn_like(z2[:, :, i + 1 :]) * 10
        with torch.no_grad():
            c, c2 = net(z), net(z2)
        torch.testing.assert_close(c2[:, :, : i + 1], c[:, :, : i + 1], rtol=0, atol=1e-6)
        if i + 1 < rows:
            assert not torch.allclose(c2[:, :, i + 1 :], c[:, :, i + 1 :])


@pytest.mark.parametrize("kind", ["masked_conv", "gru"])
def test_context_sees_every_column_of_the_rows_above(kind):
    net = _context(kind)
    zg = torch.randn(1, 4, 6, 5, requires_grad=True)
    net(zg)[:, :, 5, 2].sum().backward()  # the context at the bottom row, middle column
    # rows 2-5 (3 blocks reach 3 rows up), every column (3 blocks reach 3 columns sideways); nothing above
    assert torch.count_nonzero(zg.grad[0, :, 2:, :].abs().sum(0)) == 4 * 5
    if kind == "masked_conv":
        assert torch.count_nonzero(zg.grad[0, :, :2]) == 0


@pytest.mark.parametrize("context", ["masked_conv", "gru"])
def test_context_from_pixels_never_sees_the_patches_below(context):
    """Through the whole model: the top-down context at grid row i depends only on pixels
    above the bottom edge of row i's patches (y < i*stride + patch); the bottom-up one
    only on pixels from the top edge of its row down. With batch norm in training mode
    it would not: batch statistics leak the pixels below (why CPC v2 uses layer norm)."""
    torch.manual_seed(0)
    m = CPC(**SMALL, context=context).train()
    x = _images(2)  # 16 px: patches of 4 every 2 px, a 7 x 7 grid
    with torch.no_grad():
        z = m.patch_embeddings(x)
        for i in range(6):
            x2 = x.clone()
            x2[:, :, i * 2 + 4 :] = torch.randn_like(x2[:, :, i * 2 + 4 :])  # every pixel below row i's patches
            z2 = m.patch_embeddings(x2)
            torch.testing.assert_close(
                m.context_grid(z2, 0)[:, : i + 1], m.context_grid(z, 0)[:, : i + 1], rtol=0, atol=1e-6
            )
            top = 6 - i  # bottom-up: flipped row i is grid row 6 - i, whose patches start at y = 2 * (6 - i)
            x3 = x.clone()
            x3[:, :, : 2 * top] = torch.randn_like(x3[:, :, : 2 * top])
            z3 = m.patch_embeddings(x3)
            torch.testing.assert_close(
                m.context_grid(z3, 1)[:, : i + 1], m.context_grid(z, 1)[:, : i + 1], rtol=0, atol=1e-6
            )
        bn = CPC(**SMALL, context=context, patch_norm="batch").train()
        x2 = x.clone()
        x2[:, :, 8:] = 0.0
        leak = bn.context_grid(bn.patch_embeddings(x2), 0)[:, :3] - bn.context_grid(bn.patch_embeddings(x), 0)[:, :3]
        assert leak.abs().max() > 1e-4


# ---- InfoNCE -----------------------------------------------------------------------------


def _grid_infonce_loop(preds: dict[int, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    n, r, q, _ = targets.shape
    keys = [(b, i, j) for b in range(n) for i in range(r) for j in range(q)]
    per_offset = []
    for k, p in preds.items():
        total, count = 0.0, 0
        for b in range(n):
            for i in range(r - k):
                for j in range(q):
                    scores = [float(p[b, i, j] @ targets[kb, ki, kj]) for kb, ki, kj in keys]
                    pos = keys.index((b, i + k, j))
                    total += -(scores[pos] - math.log(sum(math.exp(s) for s in scores)))
                    count += 1
        per_offset.append(total / count)
    return torch.tensor(sum(per_offset) / len(per_offset))


def test_grid_infonce_matches_loop():
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(2, 4, 3, 5, generator=g)
    preds = {1: torch.randn(2, 3, 3, 5, generator=g), 3: torch.randn(2, 1, 3, 5, generator=g)}
    loss, acc = GridInfoNCE(gather_distributed=False)(preds, targets)
    torch.testing.assert_close(loss, _grid_infonce_loop(preds, targets), rtol=1e-5, atol=1e-5)
    assert 0 <= float(acc) <= 1
    unit = F.normalize(targets, dim=3)
    perfect = {2: unit[:, 2:] * 100}  # each prediction is its (unit-norm) target: it scores highest
    loss, acc = GridInfoNCE(False)(perfect, unit)
    assert float(acc) == 1.0 and float(loss) < 0.1
    with pytest.raises(ValueError, match="offset 2"):
        GridInfoNCE(False)({2: preds[1]}, targets)


@pytest.mark.parametrize(("context", "directions"), [("masked_conv", 2), ("gru", 1)])
def test_method_loss_matches_loop_reference(context, directions):
    torch.manual_seed(0)
    m = CPC(**SMALL, context=context, directions=directions, min_offset=2, max_offset=3, gather_distributed=False)
    x = _images(2, size=8)  # patches of 2 every 1 px: a 7 x 7 grid
    out = m([x])
    with torch.no_grad():
        z = m.patch_embeddings(x)
        t = m.target(z)
        rows = z.shape[1]
        refs = []
        for d in range(directions):
            c = m.context_grid(z, d)
            preds = {k: m.predictors[d][ki](c[:, : rows - k]) * 0.1 for ki, k in enumerate([2, 3])}
            refs.append(_grid_infonce_loop(preds, t if d == 0 else t.flip(1)))
    torch.testing.assert_close(out.loss.detach(), sum(refs) / directions, rtol=1e-4, atol=1e-5)
    assert set(out.metrics) == {"train/loss", "train/acc", "train/z_std"}
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters())  # every trainable parameter is used (DDP)


# ---- two gloo processes ------------------------------------------------------------------

B, WORLD = 2, 2
CONFIGS = [{"context": "masked_conv", "directions": 2}, {"context": "gru", "directions": 1, "min_offset": 1}]


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad.clone()


def _model(cfg: dict, gather: bool = True) -> CPC:
    torch.manual_seed(0)
    return CPC(**SMALL, **cfg, gather_distributed=gather).train()  # layer norm: no batch coupling


def _worker(rank: int, world: int) -> list[dict]:
    x = _images(world * B, seed=4)[rank * B : (rank + 1) * B]
    res = []
    for cfg in CONFIGS:
        method = _model(cfg)
        model = nn.parallel.DistributedDataParallel(method)
        loss = model([x]).loss
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        local = _model(cfg, gather=False)([x]).loss.detach()
        res.append(
            {
                "loss": (mean_loss / world).item(),
                "grads": [_grad(p) for p in method.parameters()],
                "local": local.item(),
                "gathered": loss.item(),
            }
        )
    return res


def test_two_gloo_processes_equal_one_process_with_the_global_batch():
    x = _images(WORLD * B, seed=4)
    refs = []
    for cfg in CONFIGS:
        m = _model(cfg)
        loss = m([x]).loss
        loss.backward()
        refs.append((loss.item(), [p.grad for p in m.parameters()]))
    results = run_workers(_worker, WORLD)
    for rank in range(WORLD):
        for res, (ref_loss, ref_grads) in zip(results[rank], refs, strict=True):
            assert res["loss"] == pytest.approx(ref_loss, rel=1e-5)
            for g, ref in zip(res["grads"], ref_grads, strict=True):
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
            assert res["gathered"] != pytest.approx(res["local"], rel=1e-6)  # the other worker's negatives count

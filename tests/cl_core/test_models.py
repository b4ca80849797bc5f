import pytest
import torch

from cl_core.methods import SimCLR, get_method, known_methods
from cl_core.models import SimCLRProjectionHead, build_backbone


@pytest.mark.parametrize(
    "name,kwargs,size,feat",
    [
        ("small_cnn", {}, 16, 128),
        ("small_cnn", {"width": 8}, 8, 32),
        ("small_cnn", {"width": 8, "out_width": 48}, 8, 48),
        ("resnet18", {"cifar_stem": True}, 32, 512),
        ("resnet18", {}, 64, 512),
        ("resnet50", {"cifar_stem": True}, 16, 2048),
    ],
)
def test_backbones(name, kwargs, size, feat):
    m, d = build_backbone(name, **kwargs)
    assert d == feat
    assert m(torch.randn(2, 3, size, size)).shape == (2, feat)


def test_cifar_stem_keeps_resolution():
    m, _ = build_backbone("resnet18", cifar_stem=True)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, torch.nn.Identity)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="known: resnet18, resnet50, small_cnn"):
        build_backbone("vgg")


@pytest.mark.parametrize("layers", [2, 3, 4])
def test_projection_head_layers(layers):
    head = SimCLRProjectionHead(16, 32, 8, num_layers=layers)
    assert len(head.layers) == layers
    assert all(isinstance(layer[1], torch.nn.BatchNorm1d) for layer in head.layers)
    assert isinstance(head.layers[0][-1], torch.nn.ReLU) and not isinstance(head.layers[-1][-1], torch.nn.ReLU)
    assert not head.layers[-1][1].bias.requires_grad and head.layers[0][1].bias.requires_grad
    h = torch.randn(4, 16)
    assert head(h).shape == (4, 8)
    assert head(h, upto=1).shape == (4, 32)
    with pytest.raises(ValueError, match="num_layers"):
        SimCLRProjectionHead(16, num_layers=5)


def test_the_papers_head_ablations_a_linear_head_and_none():
    """SimCLR's Figure 8: a linear projection (Linear + batch norm, no ReLU, as the TF
    code's head_proj_mode linear) and no projection (z = h) train through the method."""
    h = torch.randn(6, 16)
    linear = SimCLRProjectionHead(16, 32, 8, num_layers=1)
    assert len(linear.layers) == 1 and len(linear.layers[0]) == 2 and linear(h).shape == (6, 8)
    none = SimCLRProjectionHead(16, 32, 8, num_layers=0)
    assert len(none.layers) == 0 and torch.equal(none(h), h) and none.output_dim == 16
    for layers in (0, 1):
        m = SimCLR("small_cnn", backbone_args={"width": 8}, head_layers=layers, gather_distributed=False)
        out = m([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)])
        out.loss.backward()
        assert torch.isfinite(out.loss) and m.backbone.features[0].weight.grad is not None


def test_registry_lists_simclr_and_builds_it():
    assert "simclr" in known_methods()
    assert get_method("simclr") is SimCLR
    with pytest.raises(ValueError, match="known methods: .*simclr"):
        get_method("nope")


def test_simclr_step_is_finite_and_trains_all_parameters():
    m = SimCLR("small_cnn", backbone_args={"width": 8}, proj_dim=16, head_layers=3)
    out = m([torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    assert [n for n, p in m.named_parameters() if not p.requires_grad] == ["head.layers.2.1.bias"]
    groups = m.param_groups(1e-4)
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0 and groups[1]["lars_exclude"]
    assert all(p.ndim <= 1 for p in groups[1]["params"]) and all(p.ndim > 1 for p in groups[0]["params"])
    restored = SimCLR("small_cnn", backbone_args={"width": 8}, proj_dim=16, head_layers=3)
    restored.load_state_dict(m.state_dict())

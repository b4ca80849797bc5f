import pytest
import torch
from torch import nn

from cl_core.downstream import build_classifier, classifier_from_pretrained, classifier_spec
from cl_core.methods import SimCLR


def _spec(k: int, **kw):
    return classifier_spec(
        backbone="small_cnn", num_classes=10, from_head_layer=k, head_layers=3, proj_dim=16, width=8, **kw
    )


@pytest.mark.parametrize("k,neck_dim", [(0, 32), (1, 32), (2, 32), (3, 16)])
def test_finetune_from_head_layer_k_keeps_the_first_k_head_layers(k, neck_dim):
    method = SimCLR("small_cnn", backbone_args={"width": 8}, head_layers=3, proj_dim=16, gather_distributed=False)
    clf = classifier_from_pretrained(method, _spec(k))
    assert len(clf.neck) == k
    for i in range(k):  # the very same modules (weights shared with the pretrained head)
        assert clf.neck[i] is method.head.layers[i]
    assert clf.backbone is method.backbone
    assert clf.fc.in_features == neck_dim and clf.fc.out_features == 10
    # the stack: Linear-BN-ReLU per kept hidden layer; the output layer has no ReLU
    kinds = [type(m).__name__ for block in clf.neck for m in block]
    expected = (["Linear", "BatchNorm1d", "ReLU"] * min(k, 2)) + (["Linear", "BatchNorm1d"] if k == 3 else [])
    assert kinds == expected
    x = torch.randn(4, 3, 16, 16)
    assert clf(x).shape == (4, 10)
    method.eval(), clf.eval()
    h = method.backbone(x)
    assert torch.allclose(clf.features(x), method.head(h, upto=k))


@pytest.mark.parametrize("k", [0, 1, 2])
def test_build_classifier_has_the_same_state_dict_layout(k):
    method = SimCLR("small_cnn", backbone_args={"width": 8}, head_layers=3, proj_dim=16, gather_distributed=False)
    teacher = classifier_from_pretrained(method, _spec(k))
    rebuilt = build_classifier(_spec(k))
    rebuilt.load_state_dict(teacher.state_dict())  # strict: identical keys and shapes
    teacher.eval(), rebuilt.eval()
    x = torch.randn(3, 3, 16, 16)
    assert torch.allclose(teacher(x), rebuilt(x))


def test_spec_rejects_a_layer_beyond_the_head():
    with pytest.raises(ValueError, match=r"from_head_layer must be in \[0, 3\]"):
        _spec(4)
    with pytest.raises(ValueError, match="known: resnet18"):
        build_classifier(classifier_spec(backbone="vgg", num_classes=3))


def test_student_is_backbone_plus_linear():
    s = build_classifier(classifier_spec(backbone="small_cnn", num_classes=10, width=8))
    assert isinstance(s.neck, nn.Sequential) and len(s.neck) == 0
    assert s.fc.in_features == 32

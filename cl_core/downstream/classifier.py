"""Classifiers for the semi-supervised stages: fine-tuned teacher, supervised baseline,
distilled student.

SimCLRv2 [0] fine-tunes "from a middle layer of the projection head": the classifier is
the encoder f, then the first k layers of the pretrained projection head g, then a new
linear layer. k = 0 is the usual encoder-plus-linear fine-tuning; SimCLRv2 found k = 1
(of a 3-layer head) best. A classifier is described by a small JSON-able *spec* so that
a checkpoint can be rebuilt anywhere (:func:`build_classifier`).

- [0] Chen et al., Big Self-Supervised Models are Strong Semi-Supervised Learners,
  2020, https://arxiv.org/abs/2006.10029 (Sec. 2, "fine-tuning")
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cl_core.methods import build_method
from cl_core.models.backbones import build_backbone
from cl_core.models.heads import SimCLRProjectionHead


class Classifier(nn.Module):
    """``fc(neck(backbone(x)))``: ``neck`` holds the kept projection-head layers
    (an empty ``nn.Sequential`` for k = 0)."""

    def __init__(self, backbone: nn.Module, neck: nn.Sequential, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone, self.neck = backbone, neck
        self.feat_dim, self.num_classes = feat_dim, num_classes
        self.fc = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def classifier_spec(
    *,
    backbone: str,
    num_classes: int,
    encoder: dict[str, Any] | None = None,
    from_head_layer: int = 0,
    head_layers: int = 3,
    head_hidden_dim: int | None = None,
    proj_dim: int = 128,
    width: int = 32,
    cifar_stem: bool = False,
    in_channels: int = 3,
) -> dict[str, Any]:
    if not 0 <= from_head_layer <= head_layers:
        raise ValueError(
            f"from_head_layer must be in [0, {head_layers}] for a {head_layers}-layer head, got {from_head_layer}"
        )
    if num_classes < 2:
        raise ValueError(f"a classifier needs >= 2 classes, got {num_classes}")
    return {
        "backbone": backbone,
        "encoder": encoder,
        "num_classes": num_classes,
        "from_head_layer": from_head_layer,
        "head_layers": head_layers,
        "head_hidden_dim": head_hidden_dim,
        "proj_dim": proj_dim,
        "width": width,
        "cifar_stem": cifar_stem,
        "in_channels": in_channels,
    }


def _neck_from_head(head: nn.Module | None, k: int) -> tuple[nn.Sequential, int | None]:
    if k == 0:
        return nn.Sequential(), None
    if not isinstance(head, SimCLRProjectionHead):
        raise ValueError("fine-tuning from a head layer needs a SimCLR-style projection head; use from_head_layer=0")
    if k > head.num_layers:
        raise ValueError(f"from_head_layer={k} but the projection head has {head.num_layers} layers")
    layers = list(head.layers[:k])
    out_dim = next(m.out_features for m in layers[-1].modules() if isinstance(m, nn.Linear))
    return nn.Sequential(*layers), out_dim


def build_classifier(spec: dict[str, Any]) -> Classifier:
    """A randomly initialised classifier of ``spec`` (the supervised baseline, the student,
    or the skeleton that a teacher checkpoint is loaded into).

    With ``spec["encoder"]`` (a method record ``{"method", "kwargs"}``) the encoder is that
    method's ``encoder()`` (any architecture: two-stream CMC, CPC's patch grid, ViTs);
    otherwise a plain backbone of ``spec["backbone"]``."""
    if spec.get("encoder"):
        method = build_method(spec["encoder"], gather_distributed=False)
        return classifier_from_pretrained(method, spec, init_fc=False)
    backbone, feat_dim = build_backbone(
        spec["backbone"],
        in_channels=spec.get("in_channels", 3),
        cifar_stem=spec.get("cifar_stem", False),
        width=spec.get("width", 32),
    )
    k = spec.get("from_head_layer", 0)
    head = None
    if k:
        head = SimCLRProjectionHead(
            feat_dim, spec.get("head_hidden_dim") or feat_dim, spec["proj_dim"], spec["head_layers"]
        )
    neck, neck_dim = _neck_from_head(head, k)
    return Classifier(backbone, neck, neck_dim or feat_dim, spec["num_classes"])


def classifier_from_pretrained(method: nn.Module, spec: dict[str, Any], *, init_fc: bool = True) -> Classifier:
    """The teacher before fine-tuning: the pretrained encoder and first k head layers of
    ``method`` (weights shared, not copied) and a new linear layer (N(0, 0.01^2)
    weights, zero bias, as SimCLRv2's supervised head)."""
    neck, neck_dim = _neck_from_head(getattr(method, "head", None), spec["from_head_layer"])
    backbone, feat_dim = method.encoder(), getattr(method, "feat_dim")  # type: ignore[operator]  # noqa: B009 - any Method
    model = Classifier(backbone, neck, neck_dim or int(feat_dim), spec["num_classes"])
    if init_fc:
        nn.init.normal_(model.fc.weight, std=0.01)
        nn.init.zeros_(model.fc.bias)
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

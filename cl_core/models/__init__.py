"""Backbones and heads (the classifier built on a pretrained method: :mod:`cl_core.downstream`)."""

from cl_core.models.backbones import BACKBONES, SmallCNN, build_backbone
from cl_core.models.heads import SimCLRProjectionHead

__all__ = ["BACKBONES", "SimCLRProjectionHead", "SmallCNN", "build_backbone"]

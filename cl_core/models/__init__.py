"""Backbones and heads."""

from cl_core.models.backbones import BACKBONES, SmallCNN, build_backbone
from cl_core.models.heads import SimCLRProjectionHead

__all__ = ["BACKBONES", "SmallCNN", "SimCLRProjectionHead", "build_backbone"]

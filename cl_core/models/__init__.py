"""Backbones and heads."""

from cl_core.models.backbones import BACKBONES, SmallCNN, build_backbone
from cl_core.models.classifier import (
    Classifier,
    build_classifier,
    classifier_from_pretrained,
    classifier_spec,
)
from cl_core.models.heads import SimCLRProjectionHead

__all__ = [
    "BACKBONES", "Classifier", "SimCLRProjectionHead", "SmallCNN", "build_backbone", "build_classifier",
    "classifier_from_pretrained", "classifier_spec",
]

"""What builds on a pretrained method: the classifier (encoder + head layers + linear),
the fine-tuning, supervised-contrastive and distillation objectives, and models saved as
weights plus a recipe (:mod:`cl_core.downstream.saved`). This layer sits above
:mod:`cl_core.methods`, which sits above :mod:`cl_core.models` (``make lint`` checks the
order)."""

from cl_core.downstream.classifier import (
    Classifier,
    build_classifier,
    classifier_from_pretrained,
    classifier_spec,
)

__all__ = ["Classifier", "build_classifier", "classifier_from_pretrained", "classifier_spec"]

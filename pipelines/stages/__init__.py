"""The pipeline's stages; ``STAGES`` wires them (the body only wires, stages do the work)."""

from pipelines.config import SweepStageConfig
from pipelines.graph import StageSpec
from pipelines.stages.distill import distill
from pipelines.stages.evaluate import evaluate
from pipelines.stages.finetune import finetune
from pipelines.stages.labels import labels
from pipelines.stages.pretrain import pretrain
from pipelines.stages.register import register
from pipelines.stages.shard import shard
from pipelines.stages.sweep import sweep

STAGES = [
    StageSpec("shard", shard, lambda c: c.data),
    StageSpec("labels", labels, lambda c: c.labels, deps=("shard",)),  # before pretrain: bad fractions fail fast
    # optional: Ray Tune over the method's hyperparameters; its best values feed pretrain
    StageSpec(
        "sweep",
        sweep,
        lambda c: SweepStageConfig(sweep=c.sweep, pretrain=c.pretrain),
        deps=("shard",),
        enabled=lambda c: c.sweep.enabled and not c.is_text(),
        system_metrics=True,
    ),  # image methods only
    StageSpec("pretrain", pretrain, lambda c: c.pretrain, deps=("shard", "sweep"), system_metrics=True),
    StageSpec("finetune", finetune, lambda c: c.finetune, deps=("shard", "pretrain", "labels"), system_metrics=True),
    StageSpec(
        "distill", distill, lambda c: c.distill, deps=("shard", "pretrain", "labels", "finetune"), system_metrics=True
    ),
    StageSpec(
        "evaluate",
        evaluate,
        lambda c: c.evaluate,
        deps=("shard", "pretrain", "labels", "finetune", "distill"),
        system_metrics=True,
    ),
    # the registry names derive from the config's name when register.model_name is unset
    StageSpec(
        "register",
        register,
        lambda c: c.register.model_copy(update={"model_name": c.model_name()}),
        deps=("shard", "pretrain", "labels", "finetune", "distill", "evaluate"),
    ),
]

__all__ = ["STAGES"]

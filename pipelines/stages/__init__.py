"""The pipeline's stages; ``STAGES`` wires them (the body only wires, stages do the work)."""

from pipelines.graph import StageSpec
from pipelines.stages.evaluate import evaluate
from pipelines.stages.pretrain import pretrain
from pipelines.stages.shard import shard

STAGES = [
    StageSpec("shard", shard, lambda c: c.data),
    StageSpec("pretrain", pretrain, lambda c: c.pretrain, deps=("shard",)),
    StageSpec("evaluate", evaluate, lambda c: c.evaluate, deps=("shard", "pretrain")),
]

__all__ = ["STAGES"]

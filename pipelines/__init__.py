"""pipelines: the stages, the stage graph, the config and the CLI (uses Ray and MLflow)."""

from infra import s3 as _s3

_s3.install()  # s3:// data, shards and checkpoints in every process that runs a stage (Ray workers too)

"""pipelines: the stages, the stage graph, the config and the CLI (uses Ray and MLflow)."""

"""Errors the CLI turns into one message and an exit code (importable without Ray or MLflow)."""


class StageError(RuntimeError):
    """A stage failed; the message names the stage, the cause and, where known, the fix."""

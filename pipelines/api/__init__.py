"""``import clpipe``: the pipeline from Python, as the ``clpipe`` command runs it.

    import clpipe

    cfg = clpipe.load_config("fashion_mnist", overrides={"pretrain.epochs": 5}, work_dir="runs")
    result = clpipe.run(cfg)                         # a PipelineResult: stage runs, outputs, report
    result.stages["evaluate"].outputs["metrics"]     # the test metrics
    student = clpipe.load_model("models:/fashion_mnist-student@champion")  # a torch module
    clpipe.export("models:/fashion_mnist-student@champion", "student.onnx", "onnx")

The package is installed from ``pipelines/api`` (``pyproject.toml``'s package-dir): its
names are those of the modules below, so the CLI and the API cannot drift apart.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pipelines.config import PipelineConfig
    from pipelines.graph import PipelineResult

try:
    __version__ = importlib.metadata.version("clpipe")
except importlib.metadata.PackageNotFoundError:  # the source tree, not installed
    __version__ = "unknown"

__all__ = ["__version__", "export", "load_config", "load_model", "methods", "run"]


def load_config(
    config: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    work_dir: str | Path | None = None,
) -> PipelineConfig:
    """A validated, frozen config: a shipped name (``"default"``, ``"fashion_mnist"``), a YAML
    path or None (the embedded default), with ``overrides`` as ``{"pretrain.epochs": 5}`` or
    ``["pretrain.epochs=5"]`` (what ``--set`` takes). Raises ``ConfigError`` in one line."""
    from pipelines.config import load_config as _load

    if isinstance(overrides, dict):
        items = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    else:
        items = list(overrides or [])
    if work_dir is not None:
        items.append(f"work_dir={json.dumps(str(work_dir))}")
    return _load(config, items)


def run(
    config: PipelineConfig | str | Path | None = None,
    *,
    overrides: dict[str, Any] | list[str] | None = None,
    work_dir: str | Path | None = None,
    rerun: str | None = None,
    only: str | None = None,
    until: str | None = None,
) -> PipelineResult:
    """``clpipe run``: the stages under one MLflow parent run, cached and resumable, on the
    Ray the config names (a local one by default). Returns the PipelineResult (each stage's
    run id, outputs and whether it was cached; ``report``: the HTML report's path)."""
    from pipelines import cli
    from pipelines.config import PipelineConfig

    if isinstance(config, PipelineConfig):
        if overrides or work_dir is not None:
            raise TypeError("run(config, ...): pass overrides and work_dir to load_config, not with a loaded config")
        cfg = config
    else:
        cfg = load_config(config, overrides, work_dir)
    return cli.run(cfg, rerun=rerun, only=only, until=until)


def load_model(uri: str, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """A logged or registered model (``models:/NAME@champion``, ``models:/NAME/3``) as a torch
    module in eval mode."""
    from pipelines.models import load_model as _load

    return _load(uri, map_location=map_location)


def export(uri: str, out: str | Path, fmt: str = "state_dict") -> Path:
    """``clpipe export``: the model as a ``state_dict`` folder, ``torchscript`` or ``onnx``
    file, checked against the logged model's outputs. MLflow's tracking URI as set."""
    from pipelines.export import export as _export

    return _export(uri, out, fmt)


def methods() -> list[str]:
    """The registered self-supervised methods (``pretrain.method``)."""
    from cl_core.methods import known_methods

    return list(known_methods())

"""Logged models, MLflow's half: a torch module logged as an MLflow ``python_function``
model that loads without unpickling, and loaded back.

The data folder is :func:`cl_core.downstream.saved.save_module`'s (weights and a JSON recipe
of the architecture), the loader module is ``cl_core.downstream.saved``, and the model
carries the ``cl_core`` package as its code with pinned requirements, so it loads in an
environment made from its ``requirements.txt`` alone (``mlflow models predict``,
``mlflow models serve``) as well as with ``mlflow.pyfunc.load_model`` here.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models import Model, ModelSignature, infer_signature
from mlflow.models.model import ModelInfo
from torch import nn

import cl_core
from cl_core.downstream import saved

# the loader module of the models this logs, and the name it had before cl_core.downstream
LOADERS = (saved.__name__, "cl_core.models.saved")


def log_model(
    module: nn.Module,
    *,
    name: str,
    builder: Mapping[str, Any],
    registered_model_name: str | None = None,
    signature: ModelSignature | None = None,
    input_example: np.ndarray | None = None,
    pip_requirements: list[str] | None = None,
    code_paths: list[str] | None = None,
) -> ModelInfo:
    """Log ``module`` to the active MLflow run as ``name`` (and register it as a new version
    of ``registered_model_name`` when given).

    ``builder`` rebuilds the architecture (:mod:`cl_core.downstream.saved`); the module's
    ``state_dict`` must fit it exactly, which is checked, so a logged model always loads.
    With ``input_example`` and no ``signature``, the signature is inferred from the
    module's eval-mode output on the example. ``pip_requirements`` default: what loading
    and predicting imports, at the versions installed here (:func:`requirements`);
    ``code_paths`` default: the ``cl_core`` package, copied into the model.
    """
    if pip_requirements is None:
        pip_requirements = requirements()
    if code_paths is None:
        code_paths = [str(Path(cl_core.__file__).resolve().parent)]  # the cl_core package
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / saved.DATA_DIR
        out = saved.save_module(module, builder, data, input_example=input_example)
        if signature is None and out is not None:
            signature = infer_signature(input_example, out)
        kind = saved.read_builder(data)["kind"]
        return mlflow.pyfunc.log_model(
            name=name,
            loader_module=saved.__name__,
            data_path=str(data),
            registered_model_name=registered_model_name,
            signature=signature,
            input_example=input_example,
            pip_requirements=pip_requirements,
            code_paths=code_paths,
            model_config={"device": None},  # mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})
            metadata={"format": saved.FORMAT, "builder_kind": kind},
        )


def requirements() -> list[str]:
    """The packages a logged model's loader imports (besides MLflow, which MLflow adds),
    pinned to the installed versions: torch, torchvision (backbones, preprocessing),
    numpy and Pillow (torchvision's transforms)."""
    return [
        f"{dist}=={importlib.metadata.version(dist).split('+')[0]}"
        for dist in ("torch", "torchvision", "numpy", "pillow")
    ]


def data_path(local: str | Path, uri: str) -> Path:
    """The weights folder (``state_dict.pt``, ``builder.json``) of the downloaded model at
    ``local``; a one-line error naming ``uri`` for a model :func:`log_model` did not log."""
    meta = Model.load(str(Path(local) / "MLmodel"))
    conf = meta.flavors.get("python_function") or {}
    if conf.get("loader_module") not in LOADERS:
        raise ValueError(
            f"{uri}: not a model logged by pipelines.models.log_model (its python_function loader is "
            f"{conf.get('loader_module')!r}); pickled pytorch-flavor models are not loaded here"
        )
    return Path(local) / conf["data"]


def load_model(uri: str, *, dst_path: str | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
    """The ``torch.nn.Module`` of a model logged by :func:`log_model`, in eval mode.

    ``uri``: any MLflow model URI (``models:/NAME@champion``, ``models:/NAME/3``,
    ``runs:/RUN/NAME``, a local folder). Downloads the model (into ``dst_path`` when
    given), rebuilds the architecture from ``builder.json`` and loads the weights with
    ``torch.load(weights_only=True)``."""
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst_path)
    return saved.load_module(data_path(local, uri), map_location=map_location)


__all__ = ["data_path", "load_model", "log_model", "requirements"]

"""Models saved as weights plus a JSON recipe, so loading one unpickles nothing.

The pure-PyTorch half of a logged model (the MLflow half, logging and downloading, is
``pipelines.models``). A saved model's data folder holds two files:

- ``state_dict.pt``: the module's ``state_dict`` (tensors only), read back with
  ``torch.load(weights_only=True)``, PyTorch's restricted loader that accepts tensors
  and plain containers and refuses any other object;
- ``builder.json``: how to rebuild the architecture from this package's code,
  ``{"kind": "classifier", "spec": <cl_core.models.build_classifier spec>}`` or
  ``{"kind": "encoder", "model": {"method": NAME, "kwargs": {...}}}`` (the encoder of a
  pretrained method of :mod:`cl_core.methods`).

This module is the MLflow ``python_function`` model's ``loader_module``: MLflow calls
:func:`_load_pyfunc` with the data folder, and ``predict`` maps an array (images
``(N, C, H, W)`` float32, or token ids ``(N, L)`` int64 for text encoders) to the
module's output as a numpy array. It imports no MLflow: a logged model carries this
``cl_core`` package as its code (``code_paths``) and loads wherever torch does. The
pyfunc predicts on ``model_config={"device": ...}``, else
``MLFLOW_DEFAULT_PREDICTION_DEVICE``, else CUDA when there is one, as MLflow's pytorch
flavor does.

MLflow's pytorch flavor would instead pickle the module (``serialization_format=
"pickle"``: loading runs whatever the pickle names) or export a ``torch.export`` graph
(``"pt2"``: ``torch.export.load`` unpickles the archive's records unless MLflow is told
to vet them, and returns a graph module rather than the model's class).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cl_core.downstream.classifier import build_classifier
from cl_core.methods import build_method

FORMAT = "cl_core-state-dict/1"
DATA_DIR = "weights"  # the folder under the MLflow model's data/
WEIGHTS_FILE = "state_dict.pt"
BUILDER_FILE = "builder.json"
KINDS = ("classifier", "encoder")


def _check_kind(builder: Any) -> str:
    kind = builder.get("kind") if isinstance(builder, Mapping) else None
    if kind not in KINDS:
        raise ValueError(
            f"builder.kind: {kind!r} is not one of {', '.join(KINDS)}; give "
            "{'kind': 'classifier', 'spec': SPEC} or {'kind': 'encoder', 'model': {'method', 'kwargs'}}"
        )
    need = "spec" if kind == "classifier" else "model"
    if not isinstance(builder.get(need), Mapping):
        raise ValueError(f"builder.{need}: missing; a {kind} builder needs a '{need}' dict")
    if kind == "encoder" and not isinstance(builder["model"].get("method"), str):
        raise ValueError("builder.model.method: missing; give the pretraining method's name (cl_core.methods)")
    return kind


def build_module(builder: Mapping[str, Any]) -> nn.Module:
    """The randomly initialised architecture that ``builder`` describes."""
    if _check_kind(builder) == "classifier":
        return build_classifier(dict(builder["spec"]))
    return build_method(builder["model"], gather_distributed=False).encoder()


def _json_builder(builder: Mapping[str, Any]) -> dict[str, Any]:
    """``builder`` as it will be read back from ``builder.json`` (tuples become lists)."""
    try:
        out = json.loads(json.dumps(builder))
    except (TypeError, ValueError) as e:
        raise ValueError(f"builder: not JSON ({e}); give plain dicts, lists, strings and numbers") from None
    _check_kind(out)
    return out


def _load_state(module: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """``module.load_state_dict(state)`` (strict), with a one-line error naming ``where``."""
    mine = module.state_dict()
    missing = sorted(set(mine) - set(state))
    unexpected = sorted(set(state) - set(mine))
    shapes = sorted(k for k in set(mine) & set(state) if mine[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = [
            f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes))
            if keys
        ]
        raise ValueError(
            f"{where}: the weights do not fit the architecture that builder.json describes "
            f"({'; '.join(parts)}); log the module with the builder it was made from"
        )
    module.load_state_dict(state)


def _forward(module: nn.Module, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """``module`` in eval mode on ``x`` (on the module's device); its mode is restored."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    p = next(module.parameters(), None)
    was = module.training
    module.eval()
    try:
        with torch.inference_mode():
            out = module(t.to(p.device) if p is not None else t)
    finally:
        module.train(was)
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the module returned {type(out).__name__}, not a tensor; log a module whose forward returns one tensor"
        )
    return out.detach().cpu().numpy()


def save_module(
    module: nn.Module, builder: Mapping[str, Any], data_dir: str | Path, input_example: np.ndarray | None = None
) -> np.ndarray | None:
    """Write ``module`` to ``data_dir`` as ``state_dict.pt`` and ``builder.json``; returns
    the module's eval-mode output on ``input_example`` (None without one).

    ``builder`` rebuilds the architecture (see the module docstring); the module's
    ``state_dict`` must fit it exactly, which is checked here, so a saved module always
    loads. With ``input_example`` on CPU, the rebuilt module must give the same output."""
    builder = _json_builder(builder)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    rebuilt = build_module(builder)
    _load_state(rebuilt, state, "builder")
    out = None
    if input_example is not None:
        out = _forward(module, input_example)
        if all(p.device.type == "cpu" for p in module.parameters()):
            again = _forward(rebuilt, input_example)
            if again.shape != out.shape or not np.allclose(again, out, rtol=1e-4, atol=1e-5):
                raise ValueError(
                    "builder: the module rebuilt from it computes other outputs than the module given; "
                    "pass the builder the module was made from"
                )
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    torch.save(state, data / WEIGHTS_FILE)
    (data / BUILDER_FILE).write_text(json.dumps({"format": FORMAT, "builder": builder}, indent=2, sort_keys=True))
    return out


def read_builder(data_path: str | Path) -> dict[str, Any]:
    """The architecture's recipe in ``data_path``'s ``builder.json`` (format checked)."""
    path = Path(data_path) / BUILDER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; this is not a model logged by pipelines.models.log_model")
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise ValueError(
            f"{path}: format {record.get('format')!r}, expected {FORMAT!r}; "
            "load it with the cl_core version that logged it"
        )
    return record["builder"]


def load_module(data_path: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """The module saved in ``data_path`` (the model's ``data/weights`` folder), in eval mode.
    The weights are read with ``torch.load(weights_only=True)``: a file holding anything
    other than tensors and plain containers is refused, never executed."""
    module = build_module(read_builder(data_path))
    path = Path(data_path) / WEIGHTS_FILE
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: holds objects other than tensors, so it was not loaded; the file was not written by "
            "pipelines.models.log_model (re-log the model)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state_dict of tensors; re-log the model with pipelines.models.log_model")
    _load_state(module, state, str(path))
    return module.to(map_location).eval()


class SavedModel:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(array) -> array``."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module, self.device = module, device

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        x = model_input
        if hasattr(x, "to_numpy"):  # a pandas DataFrame or Series
            x = x.to_numpy()
        if isinstance(x, Mapping):
            if len(x) != 1:
                raise ValueError(f"predict: got inputs {', '.join(map(str, x))}; the model takes one array")
            x = next(iter(x.values()))
        if isinstance(x, list):
            x = np.asarray(x)
        if not isinstance(x, (np.ndarray, torch.Tensor)):
            raise TypeError(f"predict: got {type(x).__name__}; give a numpy array")
        return _forward(self.module, x)

    def get_raw_model(self) -> nn.Module:
        return self.module


def _pyfunc_device(model_config: Mapping[str, Any] | None) -> torch.device:
    device = (model_config or {}).get("device") or os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE")
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any] | None = None) -> SavedModel:
    """``mlflow.pyfunc.load_model``'s entry point (this module is the ``loader_module``)."""
    device = _pyfunc_device(model_config)
    return SavedModel(load_module(data_path, map_location=device), device)

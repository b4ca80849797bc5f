"""``clpipe export``: a logged or registered model as a file for use outside MLflow.

Formats:

- ``state_dict``: a folder with ``state_dict.pt`` (tensors only: ``torch.load(...,
  weights_only=True)``) and ``builder.json`` (the architecture's recipe, for
  ``cl_core.downstream.saved.build_module``);
- ``torchscript``: ``torch.jit.trace`` of the eval-mode module on the model's input
  example, loadable with ``torch.jit.load`` without this package;
- ``onnx``: ``torch.onnx.export`` (the dynamo exporter; needs ``onnx`` and
  ``onnxscript``), the batch dimension dynamic.

Every export is checked before it is kept: the exported model must give the logged
model's outputs on its input example.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import Model

from cl_core.downstream import saved
from pipelines import models

FORMATS = ("state_dict", "torchscript", "onnx")


def _example(local: Path, uri: str) -> np.ndarray:
    example = Model.load(local / "MLmodel").load_input_example(str(local))
    if example is None:
        raise ValueError(
            f"{uri}: the model has no input example to trace and check the export with; log it with "
            "input_example (the pipeline's stages do)"
        )
    return np.asarray(example)


def export(uri: str, out: str | Path, fmt: str) -> Path:
    """Write the model at MLflow ``uri`` to ``out`` in format ``fmt``; returns the path."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    data = models.data_path(local, uri)
    module = saved.load_module(data)
    x = torch.from_numpy(_example(local, uri))
    with torch.no_grad():
        want = module(x)
    if fmt == "state_dict":
        out.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), out / saved.WEIGHTS_FILE)
        shutil.copyfile(data / saved.BUILDER_FILE, out / saved.BUILDER_FILE)
        with torch.no_grad():
            _check(want, saved.load_module(out)(x), out)
        return out
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(module, x)
        traced.save(str(out))
        with torch.no_grad():
            _check(want, torch.jit.load(str(out))(x), out)
        return out
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"--format onnx: {' and '.join(missing)} not installed; pip install onnx onnxscript "
            "(and onnxruntime to run the file)"
        )
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=({0: batch},))
    assert program is not None  # the dynamo exporter returns the program
    program.save(str(out))
    if importlib.util.find_spec("onnxruntime") is not None:  # check the file where it can be run
        import onnxruntime

        sess = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        _check(want, torch.from_numpy(got), out)
    return out


def _check(want: torch.Tensor, got: torch.Tensor, out: Path) -> None:
    want, got = want.detach(), got.detach()
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
        raise RuntimeError(
            f"{out}: the exported model's outputs differ from the logged model's "
            f"(max abs diff {(want - got).abs().max().item() if want.shape == got.shape else 'shape'})"
        )


def describe(out: Path, fmt: str) -> str:
    """How to load what :func:`export` wrote."""
    return {
        "state_dict": f"torch.load('{out}/{saved.WEIGHTS_FILE}', weights_only=True); architecture: "
        f"cl_core.downstream.saved.build_module(json.load(open('{out}/{saved.BUILDER_FILE}'))['builder'])",
        "torchscript": f"torch.jit.load('{out}')",
        "onnx": f"onnxruntime.InferenceSession('{out}')",
    }[fmt]


__all__ = ["FORMATS", "describe", "export"]

"""Registered models as a state_dict plus a JSON builder (cl_core.downstream.saved): they load
back as the same module and as an MLflow pyfunc, and loading unpickles no objects.

A sqlite MLflow store in a temporary folder, no Ray."""

from __future__ import annotations

import json
import os
import pickletools
import sys
import zipfile
from pathlib import Path

import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow.models import Model
from mlflow.tracking import MlflowClient

import cl_core
from cl_core.data import shards as S
from cl_core.data.sources import ArraySource
from cl_core.downstream import build_classifier, classifier_from_pretrained, classifier_spec
from cl_core.methods import SimCLR, get_method
from pipelines import models
from tests.conftest import make_images

SIMCLR = {
    "method": "simclr",
    "kwargs": {"backbone": "small_cnn", "backbone_args": {"width": 8}, "head_layers": 2, "proj_dim": 16},
}
CPU = {"device": "cpu"}  # the pyfunc's device (default: CUDA when there is one), for exact comparisons


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite tracking store and registry; the experiment's artifacts in the same folder."""
    from pipelines import tracking

    root = tmp_path_factory.mktemp("mlflow")
    before_uri, before_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    exp_id = tracking.setup(f"sqlite:///{root / 'mlflow.db'}", "saved-models", (root / "artifacts").as_uri())
    yield exp_id
    mlflow.set_tracking_uri(before_uri)
    if before_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before_env


# pickle.find_class: the audit event of every global the standard unpickler resolves
# (torch.load(weights_only=False), pickle.load, cloudpickle). torch's weights_only loader
# resolves its allowlist itself and raises none.
_FIND_CLASS: list[tuple] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "pickle.find_class" and _FIND_CLASS is not None:
        _FIND_CLASS.append(args)


sys.addaudithook(_audit)


class _Recorder:
    def __enter__(self) -> list[tuple]:
        global _FIND_CLASS
        _FIND_CLASS = []
        return _FIND_CLASS

    def __exit__(self, *exc) -> None:
        global _FIND_CLASS
        _FIND_CLASS = None


def _teacher() -> tuple[torch.nn.Module, dict]:
    """A SimCLRv2-style teacher (encoder + first head layer + linear) and its builder."""
    method = SimCLR(**SIMCLR["kwargs"], gather_distributed=False)
    spec = classifier_spec(backbone="small_cnn", encoder=SIMCLR, num_classes=3, from_head_layer=1, head_layers=2)
    model = classifier_from_pretrained(method, spec)
    torch.nn.init.normal_(model.fc.weight)  # not the rebuilt module's init
    return model.eval(), {"kind": "classifier", "spec": spec}


def _images(n: int = 2, size: int = 12) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32)


def _out(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_a_classifier_loads_back_as_a_module_and_as_a_pyfunc(store):
    model, builder = _teacher()
    x = _images()
    with mlflow.start_run(experiment_id=store):
        info = models.log_model(
            model, name="teacher", builder=builder, registered_model_name="t-teacher", input_example=x
        )
    assert info.registered_model_version == 1
    MlflowClient().set_registered_model_alias("t-teacher", "champion", "1")
    for uri in ("models:/t-teacher@champion", "models:/t-teacher/1", info.model_uri):
        back = models.load_model(uri)
        assert type(back).__name__ == "Classifier" and not back.training
        np.testing.assert_array_equal(_out(back, x), _out(model, x))
    pf = mlflow.pyfunc.load_model("models:/t-teacher@champion", model_config=CPU)
    sig = pf.metadata.signature
    assert sig.inputs.to_dict() == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 3, 12, 12)}}]
    assert sig.outputs.to_dict() == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 3)}}]
    more = _images(5)
    np.testing.assert_allclose(pf.predict(more), _out(model, more), rtol=1e-5, atol=1e-6)
    raw = pf.get_raw_model()  # the torch module behind the pyfunc
    assert type(raw).__name__ == "Classifier" and next(raw.parameters()).device.type == "cpu"
    np.testing.assert_array_equal(_out(raw, x), _out(model, x))


def test_a_text_encoder_takes_token_ids(store):
    method = get_method("simcse")
    rec = {"method": "simcse", "kwargs": method.smoke_kwargs()}
    encoder = method(**rec["kwargs"], gather_distributed=False).encoder().eval()
    ids = method.example_batch(n=3)["views"][0].numpy()
    with mlflow.start_run(experiment_id=store):
        info = models.log_model(encoder, name="encoder", builder={"kind": "encoder", "model": rec}, input_example=ids)
    pf = mlflow.pyfunc.load_model(info.model_uri, model_config=CPU)
    assert pf.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "int64"
    np.testing.assert_allclose(pf.predict(ids), _out(encoder, ids), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_out(models.load_model(info.model_uri), ids), _out(encoder, ids))


def test_an_encoder_logged_as_the_pretrain_stage_does(store):
    """No signature or input example: the pyfunc takes the array as it comes."""
    method = SimCLR(**SIMCLR["kwargs"], gather_distributed=False)
    encoder = method.encoder().eval()
    with mlflow.start_run(experiment_id=store):
        info = models.log_model(encoder, name="encoder", builder={"kind": "encoder", "model": SIMCLR})
    x = _images(3)
    pf = mlflow.pyfunc.load_model(info.model_uri, model_config=CPU)
    assert pf.metadata.signature is None
    np.testing.assert_allclose(pf.predict(x), _out(encoder, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_out(models.load_model(info.model_uri), x), _out(encoder, x))


def _globals(pt: Path) -> set[str]:
    """The globals the pickle inside a torch.save zip names (read without unpickling)."""
    with zipfile.ZipFile(pt) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_the_artifacts_hold_no_pickled_objects_and_loading_unpickles_none(store, tmp_path):
    model, builder = _teacher()
    x = _images()
    with mlflow.start_run(experiment_id=store):
        info = models.log_model(model, name="teacher", builder=builder, input_example=x)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "data/weights/state_dict.pt", "data/weights/builder.json"} <= files
    # no pickled module (pytorch flavor model.pth / pt2, cloudpickled python_model); the code is the
    # cl_core package's own source, byte for byte (for an environment built from the requirements alone)
    assert not [f for f in files if f.endswith((".pkl", ".pth", ".pt2", ".cloudpickle"))]
    code = {f.removeprefix("code/") for f in files if f.startswith("code/") and "__pycache__" not in f}
    package = Path(cl_core.__file__).resolve().parent
    assert code == {p.relative_to(package.parent).as_posix() for p in package.rglob("*.py")}
    assert all((local / "code" / f).read_bytes() == (package.parent / f).read_bytes() for f in code)
    meta = Model.load(local / "MLmodel")
    assert set(meta.flavors) == {"python_function"}
    assert meta.flavors["python_function"]["loader_module"] == "cl_core.downstream.saved"
    assert meta.flavors["python_function"]["code"] == "code"
    reqs = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in reqs} == {"mlflow", "torch", "torchvision", "numpy", "pillow"}, reqs
    assert json.loads((local / "data/weights/builder.json").read_text())["builder"] == builder
    # the weights file is a plain state_dict: tensors (storages) and an OrderedDict only
    names = _globals(local / "data/weights/state_dict.pt")
    assert "torch._utils._rebuild_tensor_v2" in names
    assert all(
        n == "collections.OrderedDict"
        or n == "torch._utils._rebuild_tensor_v2"
        or (n.startswith("torch.") and n.endswith("Storage"))
        for n in names
    ), names

    with _Recorder() as found:  # the audit hook sees the standard unpickler at work ...
        torch.load(local / "data/weights/state_dict.pt", weights_only=False)
    assert ("torch._utils", "_rebuild_tensor_v2") in found
    with _Recorder() as found:  # ... and sees nothing while the saved model loads and predicts
        back = models.load_model(info.model_uri)
        pf = mlflow.pyfunc.load_model(info.model_uri)
        pf.predict(x)
    assert found == []
    np.testing.assert_array_equal(_out(back, x), _out(model, x))


class _Payload:
    """Would create a file when unpickled by the standard unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_weights_file_with_objects_is_refused_not_run(store, tmp_path):
    model, builder = _teacher()
    with mlflow.start_run(experiment_id=store):
        info = models.log_model(model, name="teacher", builder=builder)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    marker = tmp_path / "ran"
    weights = local / "data/weights/state_dict.pt"
    torch.save({"fc.weight": _Payload(marker)}, weights)
    with pytest.raises(ValueError, match=r"state_dict\.pt: holds objects other than tensors") as e:
        models.load_model(str(local))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="holds objects other than tensors"):
        mlflow.pyfunc.load_model(str(local))
    assert not marker.exists()


def test_a_model_logged_with_the_loaders_former_name_still_loads(store, tmp_path):
    """Models logged before cl_core.downstream name ``cl_core.models.saved`` as their loader."""
    model, builder = _teacher()
    x = _images()
    with mlflow.start_run(experiment_id=store):
        info = models.log_model(model, name="teacher", builder=builder, input_example=x)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    mlmodel = local / "MLmodel"
    text = mlmodel.read_text()
    assert "loader_module: cl_core.downstream.saved" in text
    mlmodel.write_text(text.replace("loader_module: cl_core.downstream.saved", "loader_module: cl_core.models.saved"))
    np.testing.assert_array_equal(_out(models.load_model(str(local)), x), _out(model, x))
    np.testing.assert_array_equal(mlflow.pyfunc.load_model(str(local), model_config=CPU).predict(x), _out(model, x))


def test_a_pickled_pytorch_flavor_model_is_not_loaded(store):
    model, _ = _teacher()
    with mlflow.start_run(experiment_id=store):
        info = mlflow.pytorch.log_model(
            model, name="pickled", serialization_format="pickle", pip_requirements=["torch"]
        )
    with pytest.raises(ValueError, match="not a model logged by pipelines.models.log_model") as e:
        models.load_model(info.model_uri)
    assert "'mlflow.pytorch'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "builder,error",
    [
        ({"kind": "resnet"}, r"builder\.kind: 'resnet' is not one of classifier, encoder"),
        ({"kind": "classifier"}, r"builder\.spec: missing"),
        ({"kind": "encoder", "model": {"kwargs": {}}}, r"builder\.model\.method: missing"),
        (
            {"kind": "classifier", "spec": {"backbone": "small_cnn", "num_classes": 4, "width": 8}},
            r"builder: the weights do not fit .*other shape fc\.bias, fc\.weight",
        ),
        (
            {"kind": "encoder", "model": SIMCLR},
            r"builder: the weights do not fit .*\(missing features\.0\.weight, .*unexpected backbone\.",
        ),
        ({"kind": "classifier", "spec": {"x": object()}}, r"builder: not JSON"),
    ],
)
def test_a_builder_that_does_not_rebuild_the_module_is_refused_before_logging(builder, error):
    model = build_classifier(classifier_spec(backbone="small_cnn", num_classes=3, width=8))
    with pytest.raises(ValueError, match=error) as e:
        models.log_model(model, name="m", builder=builder)
    assert "\n" not in str(e.value)


def test_a_builder_that_computes_otherwise_is_refused():
    cpc = get_method("cpc")
    kw = cpc.smoke_kwargs()
    encoder = cpc(**kw, patch_size=4, gather_distributed=False).encoder()
    other = {"kind": "encoder", "model": {"method": "cpc", "kwargs": {**kw, "patch_size": 6}}}  # the same weights
    with pytest.raises(ValueError, match="builder: the module rebuilt from it computes other outputs") as e:
        models.log_model(encoder, name="m", builder=other, input_example=_images())
    assert "\n" not in str(e.value)


# the register stage, driven directly (no Ray): tags, aliases and safe models


def _register_inputs(tmp_path: Path) -> dict:
    images, labels = make_images(12, size=12)
    source = ArraySource(images, labels, ["a", "b", "c"], "t", {"kind": "test"})
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    result = S.write_shard(source, source.refs(), shard_dir / "test-000000.tar")
    manifest = S.build_manifest(
        source=source, split_sizes={"test": 12}, shard_results={"test": [result]}, seed=0, config={}
    )
    S.write_manifest(shard_dir, manifest)

    method = SimCLR(**SIMCLR["kwargs"], gather_distributed=False)
    ckpt = tmp_path / "pretrain"
    ckpt.mkdir()
    torch.save({"model": method.state_dict()}, ckpt / "state.pt")
    teacher, builder = _teacher()
    student_spec = classifier_spec(backbone="small_cnn", num_classes=3, width=8)
    records = {}
    for role, spec, model in (("teacher", builder["spec"], teacher), ("student", student_spec, None)):
        model = model or build_classifier(spec)
        path = tmp_path / f"{role}.pt"
        torch.save({"spec": spec, "state_dict": model.state_dict()}, path)
        records[role] = {"model_path": str(path), "spec": spec}
    return {
        "shard": {"shard_dir": str(shard_dir), "manifest_sha256": "f" * 64},
        "labels": {"subsets": {"10pct": {"fraction": 0.1}}},
        "pretrain": {"checkpoint_dir": str(ckpt), "model": SIMCLR, "image_size": 12},
        "finetune": {"models": {"teacher_10pct": records["teacher"]}},
        "distill": {"models": {"student_10pct": records["student"]}},
        "evaluate": {
            "rows": [
                {"label_fraction": 0.1, "encoder_knn": 0.4, "encoder_linear": 0.5, "teacher": 0.6, "student": 0.55}
            ]
        },
    }


def test_the_register_stage_logs_safe_models_with_tags_and_aliases(store, tmp_path):
    from pipelines.config import PipelineConfig, RegisterConfig
    from pipelines.graph import StageContext, StageEnv
    from pipelines.stages._train import load_classifier
    from pipelines.stages.register import register

    inputs = _register_inputs(tmp_path)
    config = PipelineConfig(name="reg", seed=3, work_dir=str(tmp_path / "work"))  # the registry lease lives there
    upstream = {"pretrain": "run-pre", "finetune": "run-fin", "distill": "run-dis", "evaluate": "run-ev"}

    def run(rows: dict) -> dict:
        inputs["evaluate"]["rows"][0].update(rows)
        with mlflow.start_run(experiment_id=store) as r:
            ctx = StageContext(
                name="register",
                key="k" * 64,
                run_id=r.info.run_id,
                parent_run_id="run-parent",
                seed=config.seed,
                env=StageEnv.of(config),
                output_dir=tmp_path,
                upstream_run_ids=upstream,
            )
            return register(ctx, RegisterConfig(), inputs)

    first = run({})
    assert {r: (v["version"], v["champion"]) for r, v in first["versions"].items()} == {
        "encoder": ("1", True),
        "teacher": ("1", True),
        "student": ("1", True),
    }
    client = MlflowClient()
    mv = client.get_model_version_by_alias("reg-teacher", "champion")
    assert mv.tags["clpipe.stage_run_id"] == "run-fin" and mv.tags["clpipe.pipeline_run_id"] == "run-parent"
    assert mv.tags["test_top1"] == "0.600000" and mv.tags["label_fraction"] == "0.1" and mv.tags["seed"] == "3"
    assert mv.tags["clpipe.manifest_sha256"] == "f" * 64
    enc = client.get_model_version("reg-encoder", "1")
    assert enc.tags["test_knn_top1"] == "0.400000" and enc.tags["preprocessing"] == "cl_core.augment.EvalTransform(12)"

    second = run({"student": 0.7})  # the same teacher: candidate only; a better student: champion
    t = second["versions"]["teacher"]
    assert (t["version"], t["champion"], str(t["previous_champion"])) == ("2", False, "1")
    assert second["versions"]["student"]["champion"] is True
    assert str(client.get_model_version_by_alias("reg-teacher", "candidate").version) == "2"
    assert str(client.get_model_version_by_alias("reg-teacher", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("reg-student", "champion").version) == "2"

    # a better student trained on other data: its test top-1 is not comparable, so the champion stays
    inputs["shard"]["manifest_sha256"] = "e" * 64
    third = run({"student": 0.9})
    s3 = third["versions"]["student"]
    assert (s3["version"], s3["champion"], str(s3["previous_champion"])) == ("3", False, "2")
    assert str(client.get_model_version_by_alias("reg-student", "champion").version) == "2"
    assert (tmp_path / "work" / ".clpipe-leases" / "registry-reg-student.lock").exists()
    inputs["shard"]["manifest_sha256"] = "f" * 64

    # what was registered is the upstream model, loaded back without pickle
    x = _images()
    teacher = load_classifier(inputs["finetune"]["models"]["teacher_10pct"])
    with _Recorder() as found:
        back = models.load_model("models:/reg-teacher@champion")
        encoder = models.load_model("models:/reg-encoder@champion")
    assert found == []
    np.testing.assert_array_equal(_out(back, x), _out(teacher, x))
    method = SimCLR(**SIMCLR["kwargs"], gather_distributed=False)
    method.load_state_dict(torch.load(Path(inputs["pretrain"]["checkpoint_dir"]) / "state.pt")["model"])
    np.testing.assert_array_equal(_out(encoder, x), _out(method.encoder().eval(), x))

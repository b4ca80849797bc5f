from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).parents[2] / "pipelines" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_defaults():
    cfg = load_config()
    assert cfg.pretrain.method == "simclr" and cfg.pretrain.num_workers == 2
    assert cfg.tracking_uri().startswith("sqlite:///")


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "pretrain.tempreature=0.1",
            "pretrain.tempreature: unknown field; did you mean pretrain.params.simclr.temperature (a "
            "hyperparameter of simclr)?",
        ),
        (
            "pretrain.colour=1",
            "pretrain.colour: unknown field; known fields here: backbone, backbone_out_width, backbone_width, "
            "batch_size_per_worker",
        ),
        ("pretrain.method=simclrr", "pretrain.method: unknown method 'simclrr'; known methods: "),
        (
            "pretrain.params.simclr.temperature=0",
            "pretrain.params.simclr.temperature: must be a finite number > 0, got 0",
        ),
        ("pretrain.params.simclr.temperature=-0.5", "pretrain.params.simclr.temperature: must be a finite number > 0"),
        (
            "pretrain.params.simclr.tempreature=0.5",
            "pretrain.params: params.simclr.tempreature: simclr has no such hyperparameter; "
            "its hyperparameters: head_hidden_dim, head_layers, proj_dim, temperature",
        ),
        ("pretrain.params.simclrr={}", "pretrain.params: params.simclrr: unknown method"),
        ("pretrain.head_layers=3", "pretrain.head_layers: unknown field"),
        (
            "pretrain.params.simclr.head_layers=5",
            "pretrain.params.simclr.head_layers: must be 2, 3 or 4 (1: a linear head, 0: none), got 5",
        ),
        ("pretrain.batch_size_per_worker=1", "pretrain.batch_size_per_worker: must be >= 2"),
        ("pretrain.num_workers=0", "pretrain.num_workers: must be >= 1"),
        ("data.source={kind: image_folder, path: /does/not/exist}", "data.source.path: /does/not/exist does not exist"),
        ("data.source.kind=npz", "data.source.path: required for kind=npz"),
        ("data.source={kind: npz, path: /nope.npz}", "/nope.npz does not exist"),
        ("pretrain.optimizer=adam", "pretrain.optimizer: Input should be 'sgd', 'adamw' or 'lars'"),
        ("data.val_fraction=0.9", "val_fraction + test_fraction must be < 1"),
        ("bogus=1", "bogus: unknown field"),
        ("pretrain.num_workers=8", "data.min_shards (4) < pretrain.num_workers (8)"),
    ],
)
def test_bad_overrides_give_one_line_errors_naming_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    text = str(e.value)
    assert message.replace("Value error, ", "") in text
    assert len(text.splitlines()) == 1


def test_backbone_out_width_sets_the_features_dimension_of_small_cnn_only():
    from cl_core.downstream.classifier import build_classifier, classifier_spec
    from cl_core.methods import build_method

    cfg = load_config(overrides=["pretrain.backbone_width=8", "pretrain.backbone_out_width=48"]).pretrain
    model = {"method": cfg.method, "kwargs": cfg.model_kwargs()}
    assert build_method(model, gather_distributed=False).feat_dim == 48
    # the supervised baseline and the teacher are built from the same record: the same network
    clf = build_classifier(classifier_spec(backbone=cfg.backbone, encoder=model, num_classes=10))
    assert clf.fc.in_features == 48
    assert cfg.model_dump()["backbone_out_width"] == 48
    # unset, the record and the section's dump (the stage cache keys) stay as before the field existed
    unset = load_config().pretrain
    assert "out_width" not in unset.model_kwargs()["backbone_args"]
    assert "backbone_out_width" not in unset.model_dump() and "backbone_out_width" not in unset.model_dump_json()
    with pytest.raises(ConfigError, match=r"backbone_out_width: small_cnn only, but backbone is resnet18"):
        load_config(overrides=["pretrain.backbone=resnet18", "pretrain.backbone_out_width=64"])


def test_backbone_errors_name_the_backbone():
    with pytest.raises(
        ConfigError,
        match=r"^default config \+ --set: pretrain: simclr on vit_tiny: vit: image_size 16 is "
        r"not a multiple of patch_size 5$",
    ):
        load_config(overrides=["pretrain.backbone=vit_tiny", "pretrain.patch_size=5"])


def test_yaml_file_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"pretrain": {"epochs": 3, "temprature": 0.2}}))
    with pytest.raises(ConfigError, match=r"c.yaml: pretrain.temprature: unknown field"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(overrides=["pretrain.epochs"])


def test_file_then_overrides(tmp_path, image_folder):
    p = tmp_path / "c.yaml"
    p.write_text(
        yaml.safe_dump(
            {"data": {"source": {"kind": "image_folder", "path": str(image_folder)}}, "pretrain": {"epochs": 3}}
        )
    )
    cfg = load_config(p, ["pretrain.epochs=5", "pretrain.views.image_size=24"])
    assert cfg.pretrain.epochs == 5 and cfg.pretrain.views.image_size == 24
    assert cfg.data.source.kind == "image_folder" and cfg.pretrain.method_kwargs()["temperature"] == 0.5


def test_readme_yaml_snippets_validate(tmp_path, image_folder):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```yaml\n")[1:]]
    assert blocks
    for i, block in enumerate(blocks):
        p = tmp_path / f"readme-{i}.yaml"
        p.write_text(block.replace("/data/images", str(image_folder)))
        load_config(p)


def test_shipped_configs_load_by_name_and_a_missing_data_package_names_its_install_command(monkeypatch):
    """`clpipe run fashion_mnist`: a shipped config by name (the GPU variant too); where
    Debian's Fashion-MNIST package is not installed the one-line error says how to install it."""
    from pipelines import config as C

    assert {"default", "fashion_mnist", "fashion_mnist_gpu"} <= set(C.shipped_configs())
    assert C.config_path("fashion_mnist").name == "fashion_mnist.yaml"
    with pytest.raises(ConfigError, match="shipped config: default, fashion_mnist, fashion_mnist_gpu"):
        C.config_path("fashion")
    path = "/usr/share/datasets/fashion-mnist"
    for name in ("fashion_mnist", "fashion_mnist_gpu"):
        if Path(path).is_dir():
            cfg = load_config(name)
            assert cfg.data.source.kind == "idx" and cfg.data.source.path == path and cfg.name == name
        else:
            with pytest.raises(ConfigError, match=f"path: {path} does not exist; install it: apt-get install"):
                load_config(name)
    # the hint is keyed by the package's folder: shown for such a folder that is absent here
    monkeypatch.setitem(C.PACKAGED_DATA, "/nonexistent/fashion-mnist", C.PACKAGED_DATA[path])
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["data.source={kind: idx, path: /nonexistent/fashion-mnist/}"])
    assert "install it: apt-get install -y dataset-fashion-mnist (as root; or make fashion-mnist)" in str(e.value)
    assert len(str(e.value).splitlines()) <= 2


def test_one_set_of_defaults_the_models_are_default_yaml():
    """default.yaml documents the defaults; the config models hold the same ones, so a
    section built in code (``PretrainConfig()``) is the embedded default's section."""
    from pipelines.config import DEFAULT_CONFIG, PipelineConfig, flatten

    assert PipelineConfig().model_dump(mode="json") == load_config().model_dump(mode="json")
    bare = flatten(PipelineConfig().model_dump(mode="json"))
    for key, value in flatten(yaml.safe_load(DEFAULT_CONFIG.read_text())).items():
        if key == "sweep.space":  # null: the method's own space, resolved by the model
            assert value is None
            continue
        assert key in bare, f"default.yaml names {key}, which the config does not have"
        assert bare[key] == value, f"{key}: default.yaml {value!r}, the config model {bare[key]!r}"


def test_the_training_loop_takes_its_settings_from_the_section_by_name():
    """cl_core's LoopConfig and the stages' TrainingConfig: the same names and defaults (the
    loop's own defaults serve callers of cl_core that have no config), copied by name."""
    import dataclasses

    from cl_core.engine import LoopConfig
    from pipelines.config import FinetuneConfig, PretrainConfig, TrainingConfig
    from pipelines.stages._train import loop_config

    fields = TrainingConfig.model_fields
    for f in dataclasses.fields(LoopConfig):
        assert f.name in fields, f"LoopConfig.{f.name} is no TrainingConfig field"
        if f.default is not dataclasses.MISSING:
            expected = None if f.name == "channels_last" else f.default  # the config's "auto": None in the loop
            got = fields[f.name].default
            assert (None if got == "auto" and f.name == "channels_last" else got) == expected, f.name
    for section in (PretrainConfig(epochs=3, grad_clip=1.5, channels_last=True), FinetuneConfig(precision="fp32")):
        loop = loop_config(section)
        assert (loop.epochs, loop.grad_clip, loop.precision) == (section.epochs, section.grad_clip, section.precision)
        assert loop.channels_last == (True if section.channels_last is True else None)
    assert loop_config(PretrainConfig(), batch_size=7).batch_size_per_worker == 7


def test_val_checks_are_evenly_spaced_and_always_include_the_last_epoch():
    from pipelines.stages._train import val_due

    def due(epochs, checks):
        return [e for e in range(1, epochs + 1) if val_due(e, epochs, checks)]

    assert due(5, None) == [1, 2, 3, 4, 5] and due(5, 5) == due(5, 9) == [1, 2, 3, 4, 5]
    assert due(60, 10) == list(range(6, 61, 6))
    assert due(3, 2) == [2, 3] and due(7, 1) == [7]
    for epochs in range(1, 40):
        for checks in range(1, 12):
            got = due(epochs, checks)
            assert len(got) == min(epochs, checks) and got[-1] == epochs

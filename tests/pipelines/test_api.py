"""``import clpipe``: the Python API the package installs from pipelines/api."""

from pathlib import Path

import pytest
from setuptools import find_packages
from setuptools.config.pyprojecttoml import read_configuration

import clpipe
from pipelines.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_packages_are_the_source_trees_and_clpipe_is_pipelines_api():
    setup = read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]
    on_disk = set(find_packages(str(ROOT), include=["cl_core*", "pipelines*", "infra*"])) - {"pipelines.api"}
    assert on_disk == set(setup["packages"]) - {"clpipe"}, "list every new subpackage in pyproject.toml"
    assert setup["package-dir"] == {"clpipe": "pipelines/api"}
    assert Path(clpipe.__file__).resolve() == ROOT / "pipelines" / "api" / "__init__.py"
    assert clpipe.__version__ == "0.1.0" or clpipe.__version__ == "unknown"


def test_load_config_takes_overrides_as_a_dict_or_as_set_strings(tmp_path):
    cfg = clpipe.load_config(overrides={"pretrain.epochs": 3, "labels.fractions": [0.1]}, work_dir=tmp_path)
    assert (cfg.pretrain.epochs, cfg.labels.fractions, cfg.work_path()) == (3, [0.1], tmp_path)
    assert clpipe.load_config("fashion_mnist", ["pretrain.epochs=4"]).pretrain.epochs == 4
    with pytest.raises(ConfigError, match="pretrain.epochs"):
        clpipe.load_config(overrides={"pretrain.epochs": 0})
    assert "simclr" in clpipe.methods() and len(clpipe.methods()) == 14


def test_clpipe_run_returns_the_stages_and_caches_like_the_command(local_ray, tmp_path):
    overrides = {"sweep.enabled": False, "labels.fractions": [0.1], "mlflow.system_metrics_seconds": 0}
    first = clpipe.run(overrides=overrides, work_dir=tmp_path, until="labels")
    assert list(first.stages) == ["shard", "labels"] and not any(s.cached for s in first.stages.values())
    assert first.report is not None and first.report.exists()
    again = clpipe.run(clpipe.load_config(overrides=overrides, work_dir=tmp_path), until="labels")
    assert all(s.cached for s in again.stages.values())
    assert {n: s.run_id for n, s in again.stages.items()} == {n: s.run_id for n, s in first.stages.items()}
    with pytest.raises(TypeError, match="load_config"):
        clpipe.run(clpipe.load_config(), overrides=overrides)

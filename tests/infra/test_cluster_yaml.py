"""The Ray cluster configs (ray_cluster.yaml, infra/onprem_cluster.yaml) as `ray up` reads them.

Validation is Ray's own, from the installed Ray: the autoscaler JSON schema it ships
(ray/autoscaler/ray-schema.json) applied to each file as written, then `prepare_config`
(provider defaults, merged setup commands, per-type worker bounds) and `validate_config`
(schema again plus the cross-field rules), the steps `ray up` runs before it talks to a
cloud. Nothing is launched and no network is used.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
AWS = ROOT / "ray_cluster.yaml"
ONPREM = ROOT / "infra" / "onprem_cluster.yaml"
DOC = ROOT / "docs" / "cluster.md"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict), f"{path.name}: not a mapping"
    return config


def ray_up_checks(config: dict[str, Any]) -> dict[str, Any]:
    """Schema on the file as written, then Ray's own preparation and validation."""
    jsonschema.validate(config, SCHEMA)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


_QUOTED = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'")


def _has_comment(line: str) -> bool:
    return re.search(r"(^|\s)#", _QUOTED.sub("", line)) is not None


def uncommented_keys(text: str) -> list[str]:
    """Mapping keys with no `#` comment on their line nor on the line directly above."""
    lines = text.splitlines()
    missing: list[str] = []

    def walk(node: yaml.Node) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                n = key.start_mark.line
                if not (_has_comment(lines[n]) or (n > 0 and lines[n - 1].strip().startswith("#"))):
                    missing.append(f"line {n + 1}: {key.value}")
                walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)

    root = yaml.compose(text)
    assert root is not None
    walk(root)
    return missing


def non_head_types(prepared: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = prepared["head_node_type"]
    return {name: t for name, t in prepared["available_node_types"].items() if name != head}


def mounted_project_dirs(config: dict[str, Any]) -> list[str]:
    """Remote paths that receive the project root (local path '.')."""
    return [remote for remote, local in config["file_mounts"].items() if local in (".", "./")]


# --- both files ---------------------------------------------------------------


@pytest.mark.parametrize("path", [AWS, ONPREM], ids=lambda p: p.name)
def test_passes_ray_schema_and_ray_up_validation(path: Path) -> None:
    prepared = ray_up_checks(load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", [AWS, ONPREM], ids=lambda p: p.name)
def test_every_key_is_commented(path: Path) -> None:
    missing = uncommented_keys(path.read_text())
    assert not missing, f"{path.name}: keys without a comment on or above their line: {missing}"


def test_comment_check_is_live() -> None:
    text = "# about a\na: 1\nb: 2  # about b\nc:\n  d: 3\n  # about e\n  e: [1]\n"
    assert uncommented_keys(text) == ["line 4: c", "line 5: d"]
    assert uncommented_keys('a: "# not a comment"\n') == ["line 1: a"]


@pytest.mark.parametrize("path", [AWS, ONPREM], ids=lambda p: p.name)
def test_setup_installs_the_mounted_project_with_constraints(path: Path) -> None:
    config = load(path)
    remotes = mounted_project_dirs(config)
    assert remotes, f"{path.name}: file_mounts must carry the project root ('.')"
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    assert installs, f"{path.name}: no pip install in setup_commands"
    assert any("-c constraints.txt" in c and "-e ." in c for c in installs), installs
    assert any(f"cd {r}" in c for c in installs for r in remotes), (installs, remotes)
    # The pins the commands rely on are where they say.
    pins = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==", pins, re.M) and re.search(r"^torchvision==", pins, re.M)
    # Ray's merge puts them in front of the head's and the workers' own set-up.
    prepared = ray_up_checks(config)
    for kind in ("head_setup_commands", "worker_setup_commands"):
        assert prepared[kind][: len(config["setup_commands"])] == config["setup_commands"]


@pytest.mark.parametrize("path", [AWS, ONPREM], ids=lambda p: p.name)
def test_start_commands(path: Path) -> None:
    config = load(path)
    head, workers = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    assert head[0].endswith("ray stop") and workers[0].endswith("ray stop")
    start = head[-1]
    assert "ray start --head" in start
    # Without it the head runs no autoscaler: workers would never be launched.
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert "--dashboard-host=" in start
    assert "--address=$RAY_HEAD_IP:6379" in workers[-1]


def test_cluster_runs_the_installed_ray_version() -> None:
    # `ray up` and the job client talk to the cluster's Ray: keep them the same release.
    image = load(AWS)["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-"), (image, ray.__version__)
    pin = f"ray[default]=={ray.__version__}"
    assert any(pin in c for c in load(ONPREM)["setup_commands"]), f"on-prem setup must pin {pin}"


# --- AWS ----------------------------------------------------------------------


def test_aws_node_types() -> None:
    config = load(AWS)
    assert config["provider"]["type"] == "aws"
    prepared = ray_up_checks(config)
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["max_workers"] == 0 and "GPU" not in head["resources"]
    workers = non_head_types(prepared)
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    cpu = {n: t for n, t in workers.items() if t["resources"].get("CPU", 0) >= 1 and not t["resources"].get("GPU")}
    assert gpu, "no GPU worker type (resources with GPU >= 1)"
    assert cpu, "no CPU-only worker type"
    for t in (*gpu.values(), *cpu.values()):
        assert t["min_workers"] == 0 and 1 <= t["max_workers"] <= prepared["max_workers"]
        assert t["node_config"]["InstanceType"]
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in gpu.values())
    # The container runs the CUDA build of the image.
    assert config["docker"]["image"].endswith("-gpu")


BROKEN: list[tuple[str, Any, type[Exception], str]] = [
    (
        "unknown top-level key",
        lambda c: c.update(max_worker=3),
        jsonschema.ValidationError,
        "'max_worker' was unexpected",
    ),
    (
        "max_workers of the wrong type",
        lambda c: c.update(max_workers="eight"),
        jsonschema.ValidationError,
        "not of type 'integer'",
    ),
    ("negative max_workers", lambda c: c.update(max_workers=-1), jsonschema.ValidationError, "less than the minimum"),
    # Cluster resources are integers in the schema, although tasks may ask for 0.5 GPU.
    (
        "fractional GPU resource",
        lambda c: _worker(c, "GPU").update(resources={"CPU": 8, "GPU": 0.5}),
        jsonschema.ValidationError,
        "0.5 is not of type 'integer'",
    ),
    (
        "unknown node-type key",
        lambda c: _worker(c, "GPU").update(setup_commands=["true"]),
        jsonschema.ValidationError,
        "'setup_commands' was unexpected",
    ),
    ("head type not among the node types", lambda c: c.update(head_node_type="nope"), ValueError, "head_node_type"),
    (
        "min_workers above the global max",
        lambda c: _worker(c, "GPU").update(min_workers=9),
        ValueError,
        "sum of `min_workers`",
    ),
]


def _worker(config: dict[str, Any], resource: str) -> dict[str, Any]:
    for name, t in config["available_node_types"].items():
        if name != config["head_node_type"] and t["resources"].get(resource):
            return t
    raise AssertionError(f"no worker type with {resource}")


@pytest.mark.parametrize(("what", "breaks", "error", "match"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_copies_fail_validation(what: str, breaks: Any, error: type[Exception], match: str) -> None:
    config = copy.deepcopy(load(AWS))
    ray_up_checks(copy.deepcopy(config))  # the intact copy passes
    breaks(config)
    with pytest.raises(error, match=re.escape(match)):
        ray_up_checks(config)


# --- on-premises --------------------------------------------------------------


def test_onprem_machines() -> None:
    config = load(ONPREM)
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    # Ray's local provider builds its single node type itself and rejects user-defined ones.
    assert "available_node_types" not in config
    prepared = ray_up_checks(config)
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(provider["worker_ips"])
    assert "ssh_private_key" in config["auth"]


def test_onprem_rejects_node_types() -> None:
    config = load(ONPREM)
    config["available_node_types"] = {"gpu": {"resources": {"GPU": 1}, "node_config": {}}}
    config["head_node_type"] = "gpu"
    with pytest.raises(click.ClickException, match="not supported for on-premise"):
        ray_up_checks(config)


# --- docs ---------------------------------------------------------------------


def test_doc_names_the_configs_and_both_ways_to_submit() -> None:
    doc = DOC.read_text()
    for needle in (
        "ray up ray_cluster.yaml",
        "infra/onprem_cluster.yaml",
        "clpipe submit",
        "ray job submit",
        "-- clpipe run",
        "AWS_ENDPOINT_URL",
        "env_vars",
        "8265",
    ):
        assert needle in doc, f"docs/cluster.md does not mention {needle!r}"

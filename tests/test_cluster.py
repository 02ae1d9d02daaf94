"""The cluster configs against the installed Ray's own autoscaler schema (offline), and the
promises they make: the pinned Ray image, a head that offers no CPUs to trials, spot GPU workers,
no credentials, MLflow and the dashboard on the head's 127.0.0.1 only."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLOUD_CONFIGS = [REPO / "cluster.yaml", REPO / "cluster" / "gcp.yaml"]
LOCAL_TEMPLATE = REPO / "cluster" / "local.yaml"


def validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def local_config() -> dict:
    """cluster/local.yaml filled as tests/test_cluster_up.py fills it."""
    text = LOCAL_TEMPLATE.read_text().format(
        cluster_name="itl-local", head_ip="127.0.0.1", ssh_user="ray", ssh_private_key="/tmp/key",
        project=REPO, state="/tmp/itl-state", mlflow_port=5000, ray_port=6379)
    return yaml.safe_load(text)


@pytest.mark.parametrize("path", CLOUD_CONFIGS, ids=lambda p: p.name)
def test_cloud_config_is_valid_and_keeps_its_promises(path):
    import ray

    config = yaml.safe_load(path.read_text())
    validate(config)
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1 and gpu["resources"]["GPU"] >= 1
    node = gpu["node_config"]
    assert node.get("InstanceMarketOptions", {}).get("MarketType") == "spot" or node["scheduling"]["preemptible"]
    text = path.read_text().lower()
    for secret in ("aws_secret_access_key", "aws_access_key_id", "private_key_id", "password"):
        assert secret not in text
    start = " ".join(config["head_start_ray_commands"])
    assert "mlflow server --host 127.0.0.1" in start and "--dashboard-host=127.0.0.1" in start
    assert any("itl_ray" in command and "pip install" in command for command in config["setup_commands"])
    assert any("wordnet" in command for command in config["setup_commands"])


def test_local_template_is_valid():
    config = local_config()
    validate(config)
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert "docker" not in config
    start = " ".join(config["head_start_ray_commands"])
    assert "--host 127.0.0.1" in start and f"{REPO}/.venv/bin/ray start --head" in start
    assert "ray stop" not in start  # it would stop every Ray instance on the machine


@pytest.mark.parametrize("break_it", [
    lambda c: c["available_node_types"]["gpu_worker"].__setitem__("min_workers", "two"),
    lambda c: c.__setitem__("max_workers", -1),
    lambda c: c.__setitem__("head_start_ray_commands", "ray start --head"),
    lambda c: c.__setitem__("worker_nodes_typo", {}),
    lambda c: c["available_node_types"]["gpu_worker"].__setitem__("resources", {"GPU": "one"}),
], ids=["min_workers-not-a-number", "negative-max_workers", "commands-not-a-list", "unknown-key",
        "gpu-count-not-a-number"])
def test_a_broken_edit_is_caught(break_it):
    import jsonschema

    config = yaml.safe_load(CLOUD_CONFIGS[0].read_text())
    break_it(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate(config)


def test_a_head_node_type_that_does_not_exist_is_caught():
    config = yaml.safe_load(CLOUD_CONFIGS[0].read_text())
    config["head_node_type"] = "head_typo"
    with pytest.raises(ValueError, match="head_node_type"):
        validate(config)


def test_readme_on_a_cluster_names_what_it_runs():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## On a cluster", 1)[1].split("\n## ", 1)[0]
    for command in ("ray up cluster.yaml", "ray job submit", "ray dashboard cluster.yaml", "--resume",
                    "ray down cluster.yaml", "cluster/gcp.yaml", "GPU-hours"):
        assert command in section, command
    assert re.search(r"s3://", section)

"""cluster.yaml against the installed Ray's own autoscaler schema (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_cluster_yaml_is_valid():
    config = yaml.safe_load(CLUSTER.read_text())
    validate(config)
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0")
    text = CLUSTER.read_text()
    assert "aws_secret_access_key" not in text.lower() and "aws_access_key_id" not in text.lower()


def test_a_broken_edit_is_caught():
    import jsonschema

    config = yaml.safe_load(CLUSTER.read_text())
    config["available_node_types"]["gpu_worker"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(config)

"""Bad input at submission, refused before any trial starts with one line that gives the numbers:
an MLflow server that does not answer, and a trial asking for more CPUs or GPUs than any node has."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from itl_ray.errors import UserError
from itl_ray.sweep import check_fits, node_type_resources
from tests.conftest import tiny_spec
from tests.processes import ray_tmpdir  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore")


def sweep(spec: Path, *args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "itl_ray.cli", "sweep", str(spec), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_an_unreachable_mlflow_server_fails_fast_naming_it(tmp_path, mini_paths, ray_tmpdir):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{probe.getsockname()[1]}"
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'storage'}")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    started = time.time()
    line = one_line_error(sweep(spec, env=env, cwd=tmp_path))
    assert f"MLflow server {uri} is not reachable" in line
    assert time.time() - started < 120
    assert not (tmp_path / "storage").exists() and not any(ray_tmpdir.iterdir())  # no trial, no Ray


def test_more_gpus_than_any_node_is_refused_with_the_numbers(tmp_path, mini_paths, ray_tmpdir):
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'storage'}")
    db = tmp_path / "mlflow.db"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.create_experiment("tiny")  # an existing store (a new one logs its creation)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "CUDA_VISIBLE_DEVICES": ""}
    line = one_line_error(sweep(spec, "--set", "resources.gpus_per_trial=3", env=env, cwd=tmp_path))
    assert "resources.gpus_per_trial=3 but the largest node has 0 GPUs (alive nodes: 0; node types: none)" in line
    assert not client.search_runs([experiment])  # refused before the sweep's run was made


def test_more_cpus_than_any_node_is_refused_with_the_numbers(tmp_path, mini_paths, ray_tmpdir):
    """A trial asking for 64 CPUs on this machine would wait for ever: refused with both numbers."""
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'storage'}")
    db = tmp_path / "mlflow.db"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.create_experiment("tiny")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    line = one_line_error(sweep(spec, "--set", "resources.cpus_per_trial=64", env=env, cwd=tmp_path))
    found = re.search(r"resources\.cpus_per_trial=64 but the largest node has (\d+) CPUs \(alive nodes: (\d+); "
                      r"node types: none\); lower cpus_per_trial", line)
    assert found and found.group(1) == found.group(2) and int(found.group(1)) < 64, line
    assert not client.search_runs([experiment])  # refused before the sweep's run was made
    assert not (tmp_path / "storage").exists()


def test_resource_limits_count_alive_nodes_and_the_autoscalers_node_types(tmp_path):
    check_fits("GPU", 0, [], {})
    check_fits("GPU", 0.25, [1.0], {})  # small trials share a GPU
    check_fits("GPU", 4, [0.0], {"gpu_worker": 8.0})  # the autoscaler can start a node with 8
    check_fits("GPU", 2, [2.0, 0.0], {})
    with pytest.raises(UserError, match=r"gpus_per_trial=2 but the largest node has 1 GPUs \(alive nodes: 0; "
                                        r"node types: gpu_worker: 1, head: 0\)"):
        check_fits("GPU", 2, [0.0], {"head": 0.0, "gpu_worker": 1.0})
    check_fits("CPU", 8, [0.0], {"head": 0.0, "gpu_worker": 8.0})
    with pytest.raises(UserError, match=r"resources\.cpus_per_trial=16 but the largest node has 8 CPUs \(alive nodes: "
                                        r"2; node types: gpu_worker: 8, head: 0\); lower cpus_per_trial"):
        check_fits("CPU", 16, [2.0], {"head": 0.0, "gpu_worker": 8.0})
    check_fits("CPU", 16, [2.0], {"head": 0.0, "cpu_worker": None})  # Ray detects that type's CPUs: cannot tell
    # cluster.yaml's node types, as `ray up` leaves them on the head (~/ray_bootstrap_config.yaml)
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(yaml.safe_dump(yaml.safe_load((REPO / "cluster.yaml").read_text())))
    assert node_type_resources("GPU", str(bootstrap)) == {"head": 0.0, "gpu_worker": 1.0}
    assert node_type_resources("CPU", str(bootstrap)) == {"head": 0.0, "gpu_worker": 8.0}
    assert node_type_resources("GPU", str(tmp_path / "absent.yaml")) == {}

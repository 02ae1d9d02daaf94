"""`ray up` for real on this machine: the on-prem config (cluster/local.yaml) with its head at
127.0.0.1, a tiny sweep run on the head with `ray exec`, its MLflow runs read back from the
head's MLflow server, then `ray down` and a check that nothing the test started is left.

SSH: `ray up` talks to the head over SSH. The test uses its own host key, client key and sshd
config, all in a temporary folder, and no listening daemon: Ray's `ssh_proxy_command` starts
`sshd -i` (inetd mode) for each connection. That sshd gives the session its own HOME and
RAY_TMPDIR, so the head's files (~/ray_bootstrap_config.yaml, the Ray session, the local
provider's state) stay in the temporary folder and other Ray instances on this machine (other
tests call `ray.init()`) neither see this cluster nor get stopped by it.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests import processes
from tests.conftest import tiny_spec

pytestmark = pytest.mark.filterwarnings("ignore")

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "cluster" / "local.yaml"
VENV_BIN = REPO / ".venv" / "bin"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, what: str, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def sshd_or_skip(base: Path) -> Path:
    """The test's sshd config (host key, authorized client key, session HOME and RAY_TMPDIR)."""
    missing = [tool for tool, found in (("sshd", Path(SSHD).is_file()), ("ssh", shutil.which("ssh")),
                                        ("ssh-keygen", shutil.which("ssh-keygen")), ("rsync", shutil.which("rsync")))
               if not found]
    if missing:
        pytest.skip(f"`ray up` needs {', '.join(missing)}: install Debian's openssh-server and rsync (.ci/run does)")
    privsep = Path("/run/sshd")  # sshd refuses to run without its privilege separation folder
    if not privsep.is_dir():
        if os.geteuid() != 0:
            pytest.skip("sshd needs /run/sshd, which only root can create here")
        privsep.mkdir(mode=0o755, parents=True)
    ssh = base / "ssh"
    ssh.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / name)], check=True)
    shutil.copy(ssh / "client_key.pub", ssh / "authorized_keys")
    config = ssh / "sshd_config"
    config.write_text(f"""HostKey {ssh / 'host_key'}
AuthorizedKeysFile {ssh / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PidFile none
SetEnv HOME={base / 'home'} RAY_TMPDIR={base}
""")
    subprocess.run([SSHD, "-t", "-f", str(config)], check=True)
    return config


def test_ray_up_runs_a_sweep_and_ray_down_stops_it(mini_paths):
    base = Path(tempfile.mkdtemp(prefix="itlup-", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        sshd_config = sshd_or_skip(base)
        home, state = base / "home", base / "state"
        home.mkdir()
        # `ray down` runs `ray stop` on the head, which would stop every Ray instance on this
        # machine; in the test's sessions `ray` is the project's, and `ray stop` stops only the
        # process groups the head's start commands recorded.
        (home / ".bashrc").write_text(f"""ray() {{
  if [ "$1" = stop ]; then
    for file in {state}/*.pgid; do
      [ -f "$file" ] || continue
      group=$(cat "$file")
      kill -TERM -- "-$group" 2>/dev/null
      for i in $(seq 150); do kill -0 -- "-$group" 2>/dev/null || break; sleep 0.2; done
      echo "test cluster: stopped process group $group ($(basename "$file" .pgid))"
    done
    return 0
  fi
  {VENV_BIN / 'ray'} "$@"
}}
""")
        ray_port, mlflow_port = free_port(), free_port()
        filled = TEMPLATE.read_text().format(
            cluster_name=f"itl-test-{base.name}", head_ip="127.0.0.1", ssh_user=getpass.getuser(),
            ssh_private_key=base / "ssh" / "client_key", project=REPO, state=state,
            mlflow_port=mlflow_port, ray_port=ray_port)
        config = yaml.safe_load(filled)
        config["auth"]["ssh_proxy_command"] = f"{SSHD} -i -f {sshd_config}"
        cluster = base / "cluster.yaml"
        cluster.write_text(yaml.safe_dump(config, sort_keys=False))
        spec = tiny_spec(base / "tiny.yaml", mini_paths, extra=f"storage: {base / 'storage'}")
        env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        env.update(RAY_TMPDIR=str(base), TMPDIR=str(base), RAY_USAGE_STATS_ENABLED="0")

        def ray_cli(*args, timeout=300):
            return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, capture_output=True, text=True,
                                  timeout=timeout)

        try:
            started = time.time()
            up = ray_cli("up", "-y", "--no-config-cache", "--log-style", "record", str(cluster))
            assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
            wait_for(lambda: (base / "ray" / "ray_current_cluster").is_file(), "the head's Ray to start")
            wait_for(lambda: answers(f"http://127.0.0.1:{mlflow_port}/health"), "the head's MLflow server")
            print(f"ray up: cluster ready in {time.time() - started:.0f} s")

            sweep = ray_cli("exec", "--no-config-cache", "--log-style", "record", str(cluster),
                            f"RAY_ADDRESS=127.0.0.1:{ray_port} {VENV_BIN / 'itl-ray'} sweep {spec} "
                            "--set 'extra_trials=[]'", timeout=600)
            output = sweep.stdout + sweep.stderr
            assert sweep.returncode == 0, output[-4000:]
            assert f"MLflow http://127.0.0.1:{mlflow_port}" in output  # the head's server, from its ~/.bashrc

            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_port}")
            experiment = client.get_experiment_by_name("tiny")
            runs = client.search_runs([experiment.experiment_id], max_results=100)
            parents = [r for r in runs if r.data.tags.get("itl.role") == "sweep"]
            trials = [r for r in runs if r.data.tags.get("itl.role") == "trial"]
            assert len(parents) == 1 and len(trials) == 1 and len(runs) == 2
            trial = trials[0]
            assert trial.info.status == "FINISHED" and parents[0].info.status == "FINISHED"
            for metric in ("pretrain_top1", "voc07_det_map", "voc12_act_map", "sun397_acc"):
                assert 0.0 <= trial.data.metrics[metric] <= 100.0
            # The tiny spec's trial: 2 epochs of 2 iterations, validated at each epoch's end.
            assert [m.step for m in client.get_metric_history(trial.info.run_id, "pretrain/val_top1")] == [2, 4]
            assert trial.data.tags["itl.checkpoint"].startswith(str(base / "storage"))
        finally:
            down = ray_cli("down", "-y", "--log-style", "record", str(cluster), timeout=180)
            left = processes.marked(str(base))
            print(f"ray down: {len(left)} of the test's processes left, stopped now: {left}")
            processes.stop(left)
            assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
            assert "stopped process group" in down.stdout + down.stderr, down.stdout[-2000:] + down.stderr[-2000:]
            still = processes.marked(str(base))
            assert not still, f"processes left after ray down and stopping {left}: {still}"
    finally:
        shutil.rmtree(base, ignore_errors=True)

"""A real `mlflow server` for tests: started on a free loopback port over a store the test made,
asked through its REST API, stopped by its process id when the test ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tests.processes import alive


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store_uri: str, log: Path, ready_within: float = 240.0):
    """Yields the base URL (``http://127.0.0.1:PORT``) of an `mlflow server` on ``store_uri``,
    once its ``/health`` answers (waiting at most ``ready_within`` seconds on a busy machine);
    its output goes to ``log``. The server and its workers are stopped afterwards (SIGTERM to
    its process group, then SIGKILL)."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "server", "--backend-store-uri", store_uri, "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    with open(log, "w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "MLFLOW_TRACKING_URI": store_uri})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up; its output:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, sig)
            try:
                server.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
        assert not alive(server.pid)


def rest(base: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """One call of MLflow's REST API (``/api/2.0/mlflow/<endpoint>``): POST with a JSON ``body``,
    else GET with ``query``; the JSON answer."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if body is None:
        request = urllib.request.Request(f"{url}?{urllib.parse.urlencode(query)}" if query else url)
    else:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())

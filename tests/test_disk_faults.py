"""A disk the sweep cannot write (the storage folder, the MLflow store): one line naming the path
and the reason, a non-zero exit, nothing finished lost, and `--resume` finishes once it is fixed.

Real failing disks, not permissions (the tests run as root here, where chmod stops no write): a
path under a regular file (ENOTDIR) everywhere, and where the test may mount file systems, small
tmpfs mounts that are full (ENOSPC) or read-only (EROFS). Mid-sweep faults land while the trials
wait at named points (``itl_ray.barrier``)."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from itl_ray import barrier
from itl_ray.cli import main
from tests.conftest import tiny_spec
from tests.processes import ray_tmpdir  # noqa: F401 (a fixture)
from tests.sweeps import CONTROL, PRETRAINED, Driver, assert_complete, runs_by_name, trial_ids, wait_reached

pytestmark = pytest.mark.filterwarnings("ignore")

EPOCHS = 2


class Mount:
    """A tmpfs mounted at ``path`` for one test (``mount -t tmpfs``; needs CAP_SYS_ADMIN)."""

    def __init__(self, path: Path, size: str, read_only: bool = False):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")

    def fill(self) -> Path:
        """Write a file until the file system is full; returns it (remove it to free the space)."""
        filler = self.path / f"filler-{uuid.uuid4().hex}"
        with open(filler, "wb") as handle:
            try:
                while True:
                    handle.write(b"\0" * (1 << 20))
                    handle.flush()
            except OSError:
                pass
        for index in range(64):  # the last bytes too: small files into what is left
            try:
                (self.path / f"{filler.name}-{index}").write_bytes(b"\0" * 4096)
            except OSError:
                break
        return filler

    def free(self) -> None:
        for file in self.path.glob("filler-*"):
            file.unlink()

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def mounts():
    made = []

    def mount(path: Path, size: str = "64m", read_only: bool = False) -> Mount:
        made.append(Mount(path, size, read_only))
        return made[-1]

    yield mount
    for each in reversed(made):
        each.unmount()


def sweep_lines(capsys, *args) -> tuple[int, list[str]]:
    code = main(["sweep", *map(str, args)])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_error_line(code: int, lines: list[str], *words: str) -> None:
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for word in words:
        assert word in lines[0], lines


def test_storage_and_store_under_a_file_are_refused_before_ray_starts(tmp_path, mini_paths, monkeypatch, capsys):
    import ray

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {blocker / 'storage'}")
    code, lines = sweep_lines(capsys, spec)
    assert_one_error_line(code, lines, "storage", str(blocker / "storage"), "Not a directory")
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was touched

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker / 'mlflow.db'}")
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'storage'}")
    code, lines = sweep_lines(capsys, spec)
    assert_one_error_line(code, lines, "MLflow store", str(blocker), "Not a directory")
    assert not ray.is_initialized()


def test_read_only_storage_and_store_are_refused_before_ray_starts(tmp_path, mini_paths, monkeypatch, capsys,
                                                                   mounts):
    import ray

    read_only = mounts(tmp_path / "read-only", "1m", read_only=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {read_only.path / 'storage'}")
    code, lines = sweep_lines(capsys, spec)
    assert_one_error_line(code, lines, str(read_only.path / "storage"), "Read-only file system")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{read_only.path / 'mlflow.db'}")
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'storage'}")
    code, lines = sweep_lines(capsys, spec)
    assert_one_error_line(code, lines, "MLflow store", str(read_only.path), "Read-only file system")
    assert not ray.is_initialized()


def run_until_fault(tmp_path, mini_paths, monkeypatch, storage: Path, db: Path, fault) -> tuple:
    """The tiny sweep with both trials held (pretraining after epoch 1, the control after
    detection); ``fault()`` breaks a disk, the trials go on, the sweep must stop. Returns the
    driver, its exit code, the store, the spec's arguments and the environment."""
    barriers = tmp_path / "barriers"
    monkeypatch.setenv(barrier.ENVIRONMENT, str(barriers))
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {storage}")
    args = [str(spec), "--set", f"pretrain.epochs={EPOCHS}"]
    ids = trial_ids(spec, [f"pretrain.epochs={EPOCHS}"])
    points = [f"{ids[PRETRAINED]}.pretrain-epoch-1", f"{ids[CONTROL]}.detection-done"]
    for point in points:
        barrier.hold(barriers, point)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    driver = Driver(args, env, tmp_path)
    try:
        for point in points:
            wait_reached(driver, barriers, point)
        fault()
        for point in points:
            barrier.release(barriers, point)
        code = driver.finish()
    finally:
        driver.kill()
    return driver, code, args, env


def assert_stopped_with_one_line(driver: Driver, code: int, *words: str) -> None:
    ours = [line for line in driver.lines if line.startswith("error: ")]
    assert code == 2 and len(ours) == 1, driver.output[-4000:]
    for word in words:
        assert word in ours[0], ours
    assert "--resume" in ours[0]
    assert "Traceback" not in driver.output, driver.output[-6000:]
    print(ours[0])


def test_a_storage_disk_that_fills_mid_sweep_stops_it_with_one_line(tmp_path, mini_paths, ray_tmpdir, monkeypatch,
                                                                    mounts):
    disk = mounts(tmp_path / "disk", "64m")
    storage, db = disk.path / "storage", tmp_path / "mlflow.db"
    driver, code, args, env = run_until_fault(tmp_path, mini_paths, monkeypatch, storage, db, disk.fill)
    assert_stopped_with_one_line(driver, code, str(storage), "No space left on device")

    disk.free()
    again = Driver([*args, "--resume"], env, tmp_path)
    assert again.finish() == 0, again.output[-4000:]
    assert_complete(db, EPOCHS)


def test_an_mlflow_store_disk_that_fills_mid_sweep_stops_it_with_one_line(tmp_path, mini_paths, ray_tmpdir,
                                                                          monkeypatch, mounts):
    """(A read-only store is refused up front, above; a file system with the store open for
    writing cannot be remounted read-only, so mid-sweep the store's disk fills instead.)"""
    disk = mounts(tmp_path / "disk", "64m")
    db = disk.path / "mlflow.db"
    driver, code, args, env = run_until_fault(tmp_path, mini_paths, monkeypatch, tmp_path / "storage", db, disk.fill)
    assert_stopped_with_one_line(driver, code, "MLflow store", str(db))

    disk.free()
    before = runs_by_name(db)
    again = Driver([*args, "--resume"], env, tmp_path)
    assert again.finish() == 0, again.output[-4000:]
    runs = assert_complete(db, EPOCHS)
    assert {run.info.run_id for run in runs.values()} == {run.info.run_id for run in before.values()}


def test_a_driver_failure_is_traced_to_the_disk_behind_it(tmp_path):
    """The driver's failure names the disk: from a disk error anywhere in its chain, from the
    store's own write error, or, for a follow-on error that names no file (an EOFError reading back
    a truncated state file), by probing the storage folder and the store again."""
    import errno

    from itl_ray.sweep import disk_cause

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "storage"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(storage / "x"))
        except OSError as full:
            raise RuntimeError("Trial controller checkpointing failed") from full
    except RuntimeError as wrapped:
        assert disk_cause(wrapped, str(storage), uri) == f"cannot write {storage / 'x'}: No space left on device"
    store_full = RuntimeError("(sqlite3.OperationalError) database or disk is full")
    assert disk_cause(store_full, str(storage), uri) == f"cannot write the MLflow store {uri}: database or disk is full"
    assert disk_cause(EOFError("Ran out of input"), str(storage), uri) is None  # both writable: not a disk
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = disk_cause(EOFError("Ran out of input"), str(blocker / "storage"), uri)
    assert message.startswith(f"cannot write the storage folder {blocker / 'storage'}: Not a directory"), message


def test_a_full_disk_under_prepare_is_one_line_and_the_same_command_finishes_once_freed(tmp_path, raw_paths, mounts,
                                                                                        capsys):
    disk = mounts(tmp_path / "disk", size="64m")
    out = disk.path / "sun397"
    filler = disk.fill()

    def prepare_lines() -> tuple[int, list[str]]:
        code = main(["prepare", "sun397", raw_paths["sun397"], str(out), "--workers", "1"])
        lines = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
        assert "cannot write" in errors[0] and "No space left on device" in errors[0] and str(out) in errors[0]
        return code, errors

    prepare_lines()  # no room for the plan: nothing is left behind
    assert not out.exists()
    os.truncate(filler, filler.stat().st_size - (64 << 10))  # 64 KiB: the plan fits, a shard does not
    prepare_lines()
    assert (out / "plan.json").is_file() and not (out / "PREPARED.json").exists()  # not called finished
    filler.unlink()
    assert main(["prepare", "sun397", raw_paths["sun397"], str(out), "--workers", "1"]) == 0
    from itl_ray.shards import Prepared

    assert len(Prepared(out, "sun397").verify()) > 0

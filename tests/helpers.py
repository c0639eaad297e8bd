"""What the tests share that is not a fixture: real components started and torn down (clusters, faults at
fixed points), configurations, and waits. Test modules import from here; fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from controller.config import load_config
from controller.ipp import processes
from controller.ipp.client import connect_client
from controller.ipp.profile import profile_dir, url_file

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def real_mnist_dir() -> Path | None:
    """../shared/data when it holds real MNIST (tests that need real data skip without it)."""
    return SHARED_DATA if (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").exists() else None


def write_ini(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def cluster_pids(state_dir: Path) -> list[int]:
    """Every live process started for the cluster under ``state_dir``."""
    return processes.marked_processes(profile_dir(Path(state_dir)))


def wait_until(predicate, timeout: float = 30, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def hub_engines(cluster) -> set[int]:
    """The engines the hub has registered now, as a new client hears them on connecting; a long-lived client's
    ``ids`` are what it has read of the hub's notifications so far (``queue_status`` lists an engine until
    the hub has also given up its tasks, seconds after it dropped the engine)."""
    record = cluster.record
    client = connect_client(url_file(Path(record.profile_dir), record.ipp_cluster_id), timeout=10)
    try:
        return set(client.ids)
    finally:
        client.close()


def hub_log(cluster, *words: str, lines: int = 40) -> str:
    """What the controller and the engines' nannies logged about engines leaving (and any of ``words``): the
    story behind an engine the hub still lists after it died, for an assertion's message."""
    log_dir = Path(cluster.config.state_dir) / "profile" / "log"
    pattern = ("unregist", "heart", "stopped", "Nanny", "Parent", *words)
    picked = []
    for path in sorted(log_dir.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if any(word in line for word in pattern):
                picked.append(f"{path.name}: {line}")
    return "\n".join(picked[-lines:])


class HeldTasks:
    """What ``engines_holding_tasks`` yields: ``wait`` for a held task, ``release`` every one."""

    def __init__(self, folder: Path):
        self.reached, self.gate = folder / "task-held", folder / "tasks-may-go"

    def wait(self, timeout: float = 120, process=None) -> bool:
        """True once a task is held; False after ``timeout``, or as soon as ``process`` (the master) ended."""
        wait_until(
            lambda: self.reached.exists() or (process is not None and process.poll() is not None),
            timeout=timeout,
            interval=0.02,
        )
        return self.reached.exists()

    def release(self) -> None:
        self.gate.touch()


@contextlib.contextmanager
def engines_holding_tasks(client, folder: Path, when: str, targets=None, helpers: str = ""):
    """Faults at a fixed point instead of after a sleep: inside the real engines (``targets``, default all),
    a training task for which the Python expression ``when`` holds (names: spec, checkpoint, n_epochs) marks
    itself held and waits, before its first batch, until the test releases it (at most two minutes);
    ``helpers`` is code run first in the engines, for names that ``when`` uses.
    Once released, the wrapper only passes tasks through (also on an engine that a test has killed, which
    could not be asked to undo it), and a later use wraps the engines' own code again, not this wrapper."""
    held = HeldTasks(Path(folder))
    install = (
        helpers
        + f"""
import os, time
import engines.workloads.mnist as _train
_train._unheld_train_epochs = getattr(_train, "_unheld_train_epochs", _train.train_epochs)
def _held_train_epochs(spec, checkpoint, n_epochs, *args, _unheld=_train._unheld_train_epochs, **kwargs):
    if not os.path.exists({str(held.gate)!r}) and ({when}):
        open({str(held.reached)!r}, "a").close()
        deadline = time.monotonic() + 120
        while not os.path.exists({str(held.gate)!r}) and time.monotonic() < deadline:
            time.sleep(0.02)
    return _unheld(spec, checkpoint, n_epochs, *args, **kwargs)
_train.train_epochs = _held_train_epochs
"""
    )
    view = client[targets if targets is not None else client.ids]
    # the reply only: execute(block=True) also waits, with no time limit, for each engine's output to end on
    # the iopub channel, and a suite run once hung there for good
    view.execute(install, block=False).get(timeout=60)
    try:
        yield held
    finally:
        held.release()


def make_config(tmp_path: Path, data_dir: Path, slaves: int = 2, extra: str = "", threads: int = 1):
    """A cluster.ini for tests; no keeper process unless ``extra`` sets [cluster] replace_lost (or autoscaling):
    tests that kill engines on purpose expect them to stay dead."""
    ini = write_ini(
        tmp_path / "cluster.ini",
        f"""
[cluster]
name = test
slaves = {slaves}
state_dir = {tmp_path / "state"}
data_dir = {data_dir}
threads_per_engine = {threads}
download = false
engine_timeout = 90
{"" if "replace_lost" in extra else "replace_lost = false"}
{extra}
""",
    )
    return load_config(ini, environ={})


@contextlib.contextmanager
def running_cluster(tmp: Path, data_dir: Path, extra: str = "", slaves: int = 2):
    """A real local cluster (2 engines unless told); stopped afterwards, and no process of it may be left."""
    from controller.api import Cluster

    cluster = Cluster(make_config(tmp, data_dir, slaves=slaves, extra=extra))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        state_dir = cluster.config.state_dir
        cluster.close()
        leftover = wait_until(lambda: not cluster_pids(state_dir), timeout=20)
        assert leftover, f"processes left after stop: {cluster_pids(state_dir)}"


def master_restarts(cluster, *others) -> None:
    """SIGKILL every local process of the cluster (controller, its schedulers, the keeper, tunnel holders,
    local engines and their fork server), and ``others`` (``Popen``s of commands the master was running):
    what a restart of the master machine leaves is the store, state_dir and the remote slaves."""
    record = cluster.store.clusters.active(cluster.name)
    for process in others:
        process.kill()
        process.wait()
    cluster._close_client()  # the test's own client of the old controller, as a restart ends it
    marked = processes.marked_processes(Path(record.profile_dir), record.ipp_cluster_id)
    assert record.controller_pid in marked
    for pid in marked:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert wait_until(
        lambda: not processes.marked_processes(Path(record.profile_dir), record.ipp_cluster_id), timeout=20
    )

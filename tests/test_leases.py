"""One master at a time trains a run or drives a sweep: a lease in the store, checked against live processes.

The holder is a real second process; the contender is the real `cluster` CLI.
No cluster needs to run: the lease is checked before anything else, so a
contender that gets past it stops at "no cluster is running".
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from controller.errors import ExitStatus
from controller.store import RunRecord, Store
from controller.work.leases import Leases, process_identity
from controller.work.sweep.records import SweepRecord, SweepTable

NOT_RUNNING = "no cluster 'default' is running"


@pytest.fixture
def state(tmp_path) -> Path:
    with Store(tmp_path / "state") as store:
        store.runs.create(RunRecord(id="r-1", params={"epochs": 2}, state="interrupted"))
        SweepTable(store).create(
            SweepRecord(id="s-1", space=[], sampler="grid", pruner="none", n_trials=1, state="interrupted")
        )
        store.runs.create(
            RunRecord(id="s-1-t000", params={"epochs": 2}, state="interrupted", sweep_id="s-1", trial_number=0)
        )
    return tmp_path / "state"


def cli(state: Path, *argv: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTER_")}
    environ.update(CLUSTER_STATE_DIR=str(state), CLUSTER_DATA_DIR=str(state.parent / "data"))
    return subprocess.run(
        [sys.executable, "-m", "controller", *argv],
        cwd=state.parent,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


class Holder:
    """Another master: a live process holding a lease until the test ends it."""

    def __init__(self, state: Path, kind: str, key: str):
        program = (
            "import sys\nfrom controller.store import Store\nfrom controller.work.leases import Leases\n"
            f"Leases(Store({str(state)!r})).take({kind!r}, {key!r})\nprint('held', flush=True)\n"
            "sys.stdin.read()"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", program], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None  # stdout=PIPE
        assert self.process.stdout.readline().strip() == "held"

    def kill(self) -> None:  # as a master killed outright: its lease row stays behind
        self.process.kill()
        self.process.wait()


def test_resuming_a_run_another_live_master_trains_is_refused_with_exit_3(state):
    holder = Holder(state, "run", "r-1")
    try:
        result = cli(state, "train", "--resume", "r-1")
        assert result.returncode == ExitStatus.CLUSTER_STATE
        assert (
            f"run r-1 is being run by another master: process {holder.process.pid} on {socket.gethostname()}"
        ) in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        holder.kill()
    # the holder died without releasing: its lease no longer blocks
    result = cli(state, "train", "--resume", "r-1")
    assert NOT_RUNNING in result.stderr and "another master" not in result.stderr


def test_a_reused_pid_does_not_block_a_resume(state):
    stranger = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        # the lease names a live pid, but the process with that pid is not the one that took it
        with Store(state) as store:
            Leases(store)  # its table
            store.execute(
                "INSERT INTO leases VALUES ('run', 'r-1', ?, ?, ?, 0)",
                (socket.gethostname(), stranger.pid, process_identity(stranger.pid) + "0"),
            )
            assert Leases(store).get("run", "r-1").pid == stranger.pid
        result = cli(state, "train", "--resume", "r-1")
        assert NOT_RUNNING in result.stderr and "another master" not in result.stderr
    finally:
        stranger.kill()
        stranger.wait()


def test_resuming_a_sweep_another_live_master_drives_is_refused_and_so_are_its_trials(state):
    holder = Holder(state, "sweep", "s-1")
    try:
        result = cli(state, "sweep", "--resume", "s-1")
        assert result.returncode == ExitStatus.CLUSTER_STATE
        assert f"sweep s-1 is being run by another master: process {holder.process.pid}" in result.stderr
        result = cli(state, "train", "--resume", "s-1-t000")
        assert result.returncode == ExitStatus.CLUSTER_STATE
        assert "sweep s-1 is being run by another master" in result.stderr
    finally:
        holder.kill()
    assert NOT_RUNNING in cli(state, "sweep", "--resume", "s-1").stderr


def test_a_lease_is_released_when_its_holder_ends(tmp_path):
    with Store(tmp_path) as store:
        leases = Leases(store)
        with leases.hold("run", "r-9") as lease:
            assert leases.get("run", "r-9") == lease and lease.pid == os.getpid()
            leases.check_free("run", "r-9")  # its own holder may go on
        assert leases.get("run", "r-9") is None

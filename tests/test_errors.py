"""Failures below the CLI end as one line and their exit code, never as a Python traceback.

Each case runs the real `cluster` CLI in a subprocess against a real fault: an
EC2 endpoint (moto's server) that refuses the credentials, a store whose write
lock another process holds, a store row damaged outside `cluster`.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from controller.errors import ExitStatus
from controller.store import RunRecord, Store

REPO = Path(__file__).resolve().parent.parent


def cli(tmp_path: Path, *argv: str, code: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    """`cluster ARGV` in a fresh interpreter; ``code`` runs first (e.g. to shorten a timeout)."""
    program = f"import sys\n{code}\nfrom controller.cli import main\nsys.exit(main(sys.argv[1:]))"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CLUSTER_", "AWS_"))}
    environ.update(CLUSTER_STATE_DIR=str(tmp_path / "state"), CLUSTER_DATA_DIR=str(tmp_path / "data"), **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", program, *argv], cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120
    )


def assert_one_line(result: subprocess.CompletedProcess, status: ExitStatus, *fragments: str) -> None:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("cluster ")]  # not progress
    assert len(lines) == 1 and "Error" not in result.stderr.replace(lines[0], ""), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def refusing_ec2():
    """moto's EC2 server with IAM checks on: the test credentials are unknown, every call is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom moto.server import ThreadedMotoServer\n"
            f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start()\n"
            "print('up', flush=True)\ntime.sleep(600)",
        ],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "up"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def test_a_refused_describe_during_stop_is_one_line_and_exit_4(tmp_path, refusing_ec2):
    (tmp_path / "cluster.ini").write_text(
        f"[cluster]\nname = test\nprovider = aws\n[aws]\nregion = us-east-1\nendpoint_url = {refusing_ec2}\n"
    )
    result = cli(
        tmp_path,
        "stop",
        env={
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        },
    )
    assert_one_line(
        result,
        ExitStatus.PROVIDER,
        "cluster stop: error: describing the cluster's instances",
        "AWS refused (AuthFailure)",
    )


def test_a_store_locked_past_the_busy_timeout_is_one_line_and_exit_3(tmp_path):
    Store(tmp_path / "state").close()
    holder = sqlite3.connect(tmp_path / "state" / "cluster.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    try:
        result = cli(
            tmp_path,
            "start",
            "--slaves",
            "1",
            code="import controller.store.database\ncontroller.store.database.BUSY_TIMEOUT_S = 1",
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_one_line(
        result,
        ExitStatus.CLUSTER_STATE,
        "cluster start: error:",
        "cluster.db: the store stayed locked by another process for 1 s",
    )
    with Store(tmp_path / "state") as store:
        assert store.clusters.all() == [], "nothing was started"


def test_a_run_with_corrupt_json_in_the_store_is_one_line_and_exit_1(tmp_path):
    with Store(tmp_path / "state") as store:
        store.runs.create(RunRecord(id="r-1", params={"lr": 0.1}))
        store.execute("UPDATE runs SET params = ? WHERE id = ?", ('{"lr": 0.1', "r-1"))
    result = cli(tmp_path, "runs")
    assert_one_line(
        result, ExitStatus.ERROR, "cluster runs: error:", "cluster.db: the params of run r-1 is not valid JSON"
    )


def test_a_sweep_with_corrupt_json_in_the_store_is_one_line_and_exit_1(tmp_path):
    from controller.work.sweep.records import SweepRecord, SweepTable

    with Store(tmp_path / "state") as store:
        SweepTable(store).create(SweepRecord(id="s-1", space=[], sampler="grid", pruner="none", n_trials=1))
        store.execute("UPDATE sweeps SET space = 'not json' WHERE id = 's-1'")
    result = cli(tmp_path, "sweeps")
    assert_one_line(result, ExitStatus.ERROR, "cluster sweeps: error:", "the space of sweep s-1 is not valid JSON")


def test_one_data_error_for_engines_store_and_cli(tmp_path):
    import controller.errors
    import engines.data
    from controller.store import CheckpointError

    assert controller.errors.DataError is engines.data.DataError
    assert issubclass(CheckpointError, controller.errors.DataError)
    # an engine's data error raised on the master (CIFAR-10 read in-process) is one line and exit 1 too
    result = cli(
        tmp_path,
        "runs",
        code="import controller.api, engines.workloads.cifar\n"
        "controller.api.Cluster.runs = lambda self, **_: engines.workloads.cifar.load_cifar10('/nowhere')",
    )
    assert_one_line(result, ExitStatus.ERROR, "cluster runs: error:", "/nowhere")

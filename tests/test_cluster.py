"""A real local cluster driven through the `cluster` command: start, status, train, runs, stop."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import ipyparallel as ipp
import pytest
import torch

from controller.api import Cluster
from controller.cli import main
from controller.ipp import processes
from controller.ipp.client import confirm_client_output, confirm_output, connect_client, silence_report
from controller.ipp.profile import profile_dir
from controller.store import Store
from engines import tasks
from engines.loop import load_checkpoint
from tests.helpers import (
    cluster_pids,
    engines_holding_tasks,
    hub_engines,
    hub_log,
    make_config,
    running_cluster,
    wait_until,
)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """The CLI in this process (for refusals: the exit code and message, no process of its own needed)."""
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# `python -m controller`, saying at exit whether the master imported torch: only engines need it (1.6 s of CPU
# and 600 MB per command); a reply that pickles a torch object, even a version string, would import it
MASTER = """
import runpy, sys
try:
    runpy.run_module("controller", run_name="__main__", alter_sys=True)
finally:
    if "torch" in sys.modules:
        sys.stderr.write("[the master imported torch]\\n")
"""


def cli(*argv, env=None, cwd=None, check=True, timeout=240) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", MASTER, *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"cluster {' '.join(argv)} exited {result.returncode}:\n{result.stderr}")
    assert "[the master imported torch]" not in result.stderr, f"cluster {' '.join(argv)}"
    return result


@pytest.fixture
def env(isolated) -> dict:
    return dict(os.environ)


def test_start_train_stop_end_to_end_leaves_no_process(env, isolated):
    state_dir = Path(env["CLUSTER_STATE_DIR"])
    try:
        started = json.loads(cli("start", "--slaves", "2", "--json", env=env, cwd=isolated).stdout)
        assert started["state"] == "running" and len(started["engines"]) == 2

        status = json.loads(cli("status", "--json", env=env, cwd=isolated).stdout)
        assert {e["state"] for e in status["engines"]} == {"idle"}
        for engine in status["engines"]:
            assert set(engine) >= {"id", "pid", "host", "device", "state", "threads", "uptime_s"}
            assert engine["device"] == "cpu" and engine["threads"] == max(1, os.cpu_count() // 2)
        url_file = Path(status["url_file"])
        assert url_file.is_relative_to(state_dir) and url_file.stat().st_mode & 0o777 == 0o600

        second = cli("start", "--slaves", "2", env=env, cwd=isolated, check=False)
        assert second.returncode == 3 and "already running" in second.stderr

        other = dict(env, CLUSTER_STATE_DIR=str(isolated / "elsewhere"))
        assert "not running" in cli("status", env=other, cwd=isolated).stdout

        trained = cli("train", "--epochs", "2", "--subset", "300", "--json", env=env, cwd=isolated)
        run = json.loads(trained.stdout)
        assert run["state"] == "completed" and 0 <= run["test_accuracy"] <= 1
        assert run["images_per_s"] > 0 and run["seconds"] > 0
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        assert f"{run['id']} epoch 1/2" in trained.stderr and f"{run['id']} epoch 2/2" in trained.stderr

        runs = json.loads(cli("runs", "--json", env=env, cwd=isolated).stdout)["runs"]
        assert [r["id"] for r in runs] == [run["id"]]
        assert "epochs" in cli("runs", env=env, cwd=isolated).stdout

        # a plain ipyparallel client reaches the engines through the connection file
        client = ipp.Client(str(url_file), timeout=15)
        try:
            assert sorted(client[:].apply_sync(os.getpid)) == sorted(e["pid"] for e in status["engines"])
        finally:
            client.close()
        assert cluster_pids(state_dir)
    finally:
        stopped = cli("stop", env=env, cwd=isolated, check=False)
    assert stopped.returncode == 0, stopped.stderr
    assert wait_until(lambda: not cluster_pids(state_dir), timeout=20), cluster_pids(state_dir)
    assert "nothing to stop" in cli("stop", env=env, cwd=isolated).stdout
    assert "not running" in cli("status", env=env, cwd=isolated).stdout
    assert Store(state_dir).runs.all()[0].state == "completed", "history is kept"


@pytest.fixture(scope="class")
def cluster(tmp_path_factory, tiny_data_dir):
    """A 2-engine cluster shared by the tests of one class."""
    with running_cluster(tmp_path_factory.mktemp("cluster"), tiny_data_dir) as cluster:
        yield cluster


@pytest.fixture(scope="class")
def three_engines(tmp_path_factory, tiny_data_dir):
    with running_cluster(tmp_path_factory.mktemp("cluster"), tiny_data_dir, slaves=3) as cluster:
        yield cluster


class TestEnginesThatDie:
    """One 3-engine cluster for the class: each test takes an engine of its own (``victim``), the last
    every engine still alive, and the fixture's stop (running_cluster) checks that nothing of the
    cluster is left running."""

    @staticmethod
    def victim(cluster: Cluster, node_id: str):
        return next(e for e in cluster.store.engines.of(cluster.record.id) if e.node_id == node_id)

    def test_a_crashed_engine_shows_in_status_and_stop_still_cleans_up(self, three_engines):
        cluster = three_engines
        victim = self.victim(cluster, "local-1")
        os.kill(victim.pid, signal.SIGKILL)
        # the other test's victim may be gone already: wait for this one's own death, then the state
        status = wait_until(
            lambda: (
                (s := cluster.status()).state == "degraded"
                and {e.id: e.state for e in s.engines}[victim.engine_id] == "dead"
                and s
            ),
            timeout=10,
        )
        assert status, cluster.status()
        # the hub hears it from the engine's nanny at once (its heartbeat would take 4 s)
        dropped = wait_until(lambda: victim.engine_id not in hub_engines(cluster), timeout=15)
        if not dropped:
            print(hub_log(cluster, lines=400))  # in full under "Captured stdout": an assertion's text is cut
        assert dropped, (victim, hub_engines(cluster), cluster.client.ids)

    def test_a_frozen_engine_is_dropped_within_seconds(self, three_engines):
        """A slave that vanishes without a word (a spot instance taken back) leaves no nanny to tell the
        controller; the hub's heartbeat (0.8 s x 4 misses) drops it within 5 s, ipyparallel's default 33 s."""
        import time

        victim = self.victim(three_engines, "local-2")
        client = three_engines.client
        assert victim.engine_id in client.ids
        os.kill(victim.pid, signal.SIGSTOP)  # frozen: its nanny sees it alive, only the heartbeat can tell
        frozen_at = time.monotonic()
        try:
            dropped = wait_until(lambda: victim.engine_id not in hub_engines(three_engines), timeout=60, interval=0.05)
            elapsed = time.monotonic() - frozen_at
        finally:
            os.kill(victim.pid, signal.SIGKILL)
        assert dropped, f"the hub never dropped the frozen engine\n{hub_log(three_engines)}"
        assert elapsed < 10, f"the frozen engine was dropped after {elapsed:.1f} s (expected about 4 s)"

    def test_no_engine_left_ends_the_run_after_engine_timeout(self, three_engines, tmp_path):
        """Last in the class: it kills every engine the others left (all three when it runs alone)."""
        cluster = three_engines
        engines = cluster.store.engines.of(cluster.record.id)

        def alive() -> list:
            return [e for e in engines if processes.pid_alive(e.pid)]

        # the run must hold on a live engine: wait until the others' victims are gone (a SIGKILL lands a
        # moment later) and the client lists exactly the engines still alive
        held_on_live = wait_until(
            lambda: alive() and hub_engines(cluster) == {e.engine_id for e in alive()}, timeout=30
        )
        if not held_on_live:
            print(hub_log(cluster, lines=400))
        assert held_on_live, (hub_engines(cluster), cluster.client.ids, alive())
        survivors = alive()
        impatient = tmp_path / "impatient.ini"
        impatient.write_text(
            Path(cluster.config.source).read_text().replace("engine_timeout = 90", "engine_timeout = 5")
        )

        def kill_every_engine() -> None:
            for engine in survivors:
                os.kill(engine.pid, signal.SIGKILL)

        code, err = TestWorkThatCannotFinish.run_held_at_its_second_task(
            cluster, tmp_path, impatient, kill_every_engine
        )
        assert code == 3 and "no engine has been registered for 5 s ([cluster] engine_timeout = 5)" in err, err
        assert "`cluster scale N` (slaves with engines again), then continue it with" in err, err
        TestWorkThatCannotFinish.assert_interrupted_with_hint(cluster.store, err)


def test_a_task_that_hangs_has_its_engine_killed_and_the_run_finishes_on_another(tmp_path, tiny_data_dir, caplog):
    """A hung CUDA kernel or NCCL call keeps the engine's heartbeat alive: only the task's silence tells. The
    run's first task hangs before its first batch (held, never released); after [cluster] stall_minutes (15 s)
    the scheduler kills that engine through its nanny, and the run finishes on the other engine. Were it not
    killed, the hold would end after two minutes and the run would finish on the hung engine."""
    import logging

    (tmp_path / "cluster").mkdir()
    with running_cluster(tmp_path / "cluster", tiny_data_dir, extra="stall_minutes = 0.25") as cluster:
        engines = cluster.store.engines.of(cluster.record.id)
        first_task_only = f"not os.path.exists({str(tmp_path / 'task-held')!r})"
        with (
            engines_holding_tasks(cluster.client, tmp_path, when=first_task_only) as held,
            caplog.at_level(logging.WARNING, logger="controller.work.scheduler"),
        ):
            result = cluster.train(epochs=1)
            assert held.reached.exists()
        [hung] = [e for e in engines if not processes.pid_alive(e.pid)]
        assert result.run.state == "completed" and result.run.epochs_done == 1
        assert result.run.engine_id != hung.engine_id
        assert f"its task on engine {hung.engine_id} reported no progress for" in caplog.text
        assert "stall_minutes = 0.25" in caplog.text


def test_two_clusters_in_one_state_dir_are_stopped_apart(tmp_path, tiny_data_dir):
    first = Cluster(make_config(tmp_path, tiny_data_dir, slaves=1))
    (tmp_path / "b").mkdir()
    second_config = make_config(tmp_path / "b", tiny_data_dir, slaves=1)
    second = Cluster(
        dataclasses.replace(
            second_config,
            cluster=dataclasses.replace(second_config.cluster, name="other", state_dir=first.config.state_dir),
        )
    )
    try:
        first.start()
        second.start()
        survivor = second.status()
        first.stop()
        assert second.status().state == "running"
        assert [e.state for e in second.status().engines] == ["idle"]
        assert second.client[:].apply_sync(os.getpid) == [survivor.engines[0].pid]
    finally:
        first.stop()
        second.stop()
    assert wait_until(lambda: not cluster_pids(first.config.state_dir), timeout=20)


class LossyOutput:
    """Stands in for an ipyparallel client, as a real one cannot be made to lose a message on cue: the first
    ``lost[engine]`` cells an engine runs never have their output arrive (their "idle" status was dropped);
    an engine in ``leaves`` unregisters before its first cell."""

    def __init__(self, lost: dict[int, float], leaves: tuple[int, ...] = ()):
        self.lost, self.leaves = lost, leaves
        self.cells: dict[int, int] = {}
        self.ids = sorted(lost)

    def queue_status(self) -> dict:
        return {**{engine: {"queue": 0, "tasks": 0, "completed": 0} for engine in self.ids}, "unassigned": 0}

    def __getitem__(self, engine: int):
        if engine in self.leaves:
            raise IndexError(f"No such engine: {engine}")
        return types.SimpleNamespace(execute=lambda code, silent, block: self._cell(engine))

    def _cell(self, engine: int):
        self.cells[engine] = self.cells.get(engine, 0) + 1
        arrives = self.cells[engine] > self.lost[engine]

        def wait_for_output(timeout: float) -> bool:
            if not arrives:
                time.sleep(timeout)
            return arrives

        return types.SimpleNamespace(wait_for_output=wait_for_output)


class TestConfirmingEngineOutput:
    def test_cells_are_run_until_one_reports_its_output_from_each_engine(self):
        client = LossyOutput({0: 3, 1: 1})
        assert confirm_output(client, [0, 1], timeout=60) == []
        assert client.cells == {0: 4, 1: 2}

    def test_engines_whose_output_never_arrives_are_named_once_the_time_is_up(self, caplog):
        client = LossyOutput({0: math.inf, 1: math.inf})
        assert confirm_output(client, [0, 1], timeout=0.5) == [0, 1]
        assert "no output of engine(s) [0, 1] reached the master within 0.5 s" in caplog.text

    def test_an_engine_that_leaves_meanwhile_is_not_waited_for(self, caplog):
        client = LossyOutput({0: 0, 1: 0}, leaves=(1,))
        assert confirm_output(client, [0, 1], timeout=60) == []
        assert client.cells == {0: 1} and "no output" not in caplog.text

    def test_a_new_client_is_confirmed_by_the_first_engine_whose_output_arrives(self):
        client = LossyOutput({0: math.inf, 1: 2})  # engine 0 frozen: a new client does not wait for it
        assert confirm_client_output(client, timeout=60)
        assert client.cells[1] == 3


class TestFirstContactWithNewEngines:
    """Engines that registered but stay silent to the master's client are asked again through a new client.

    A client is made deaf for real by ending its IO thread (every request and reply of an ipyparallel client
    passes there): the controller and the engines are as they were, so a new client must reach them."""

    def test_engines_silent_to_a_deaf_client_are_recorded_through_a_new_one(self, local_cluster, monkeypatch, caplog):
        from controller.cluster import joining

        monkeypatch.setattr(joining, "FIRST_CONTACT_S", 1)
        monkeypatch.setattr(joining, "REPORT_TIMEOUT_S", 20)
        record = local_cluster.record
        before = {engine.engine_id: engine.pid for engine in local_cluster.store.engines.of(record.id)}
        deaf = connect_client(local_cluster.url_file)
        deaf._stop_io_thread()
        try:
            joining.record_engines(
                local_cluster.store,
                local_cluster.config,
                record,
                deaf,
                record.threads_per_engine,
                local_cluster.store.nodes.of(record.id),
            )
        finally:
            deaf.close()
        assert {engine.engine_id: engine.pid for engine in local_cluster.store.engines.of(record.id)} == before
        assert "engine(s) [0, 1] silent to the master for 1 s (the controller did not answer this client" in caplog.text
        assert "the client's IO thread has ended" in caplog.text
        assert "answered a new client" in caplog.text

    def test_the_report_on_silent_engines_gives_the_controllers_count_of_their_work(self, local_cluster):
        report = silence_report(local_cluster.client, [0, 1, 7])
        assert report.startswith("the controller counts engine 0: completed ")
        assert "engine 7: not registered" in report


def test_stale_pids_are_never_signalled(tmp_path):
    from controller.ipp import processes

    stranger = subprocess.Popen(["sleep", "30"])
    try:
        assert not processes.is_marked(stranger.pid)
        processes.kill_cluster_processes(profile_dir(tmp_path), "test-1")
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_training_needs_a_running_cluster_and_valid_parameters(isolated):
    code, _, err = run_cli("train")
    assert code == 3 and "no cluster 'default' is running" in err
    code, _, err = run_cli("train", "--resume", "r-x", "--lr", "0.1")
    assert code in (2, 3)


class TestOnARunningCluster:
    def test_engines_load_the_data_set_as_they_start_so_the_first_run_does_not(self, local_cluster, tiny_data_dir):
        everyone = local_cluster.client[:]
        everyone.execute("from engines import data as _data; _held = sorted(d for d, _ in _data._CACHE)", block=True)
        assert everyone.pull("_held", block=True) == [[str(tiny_data_dir.resolve())]] * 2

    def test_a_new_client_gets_the_output_of_its_first_cell_from_every_engine(self, local_cluster):
        """A client just connected misses engine output until its subscription lands: without the check that
        Cluster.client makes, 1 in 50 new clients (4 in 100 on a loaded master) lost a cell's output, and
        `execute(block=True)` or `%px` waited for it for ever."""
        for _ in range(40):
            local_cluster._close_client()
            cell = local_cluster.client[:].execute("print('hello')", block=False)
            cell.get(timeout=60)
            assert cell.wait_for_output(timeout=60), "an engine's output never reached the new client"
            assert cell.stdout == ["hello\n"] * 2

    def test_engines_stream_training_progress_to_the_master(self, local_cluster):
        """The live view's data: a task on a real engine publishes progress the master reads while it runs."""
        assert local_cluster.client[:].apply_sync(tasks._in_engine) == [True] * len(local_cluster.client.ids)
        published = local_cluster.client.load_balanced_view().apply_async(tasks._publish, {"epoch": 1, "batch": 3})
        published.get(timeout=30)
        assert wait_until(lambda: (published.data.get("progress") or {}).get("batch") == 3, timeout=30)

    def test_bad_training_parameters_are_refused_before_anything_runs(self, local_cluster):
        config = str(local_cluster.config.source)
        code, _, err = run_cli("--config", config, "train", "--optimizer", "rmsprop")
        assert code == 2 and "train --optimizer = 'rmsprop': expected one of adam, sgd" in err
        code, _, err = run_cli("--config", config, "train", "--resume", "r-nope")
        assert code == 2 and "--resume r-nope: no such run" in err

    def test_an_interrupted_run_resumes_to_the_same_weights_as_an_uninterrupted_one(self, local_cluster, tmp_path):
        config = local_cluster.config.source
        store = local_cluster.store
        whole = local_cluster.train(epochs=4, seed=5)
        assert whole.run.state == "completed"

        # The interrupt comes at a fixed point, not after a sleep: every engine holds the run's second task
        # (the first that starts from a checkpoint, so epoch 1 is stored) until the test lets it go.
        with engines_holding_tasks(local_cluster.client, tmp_path, when="checkpoint is not None") as held:
            process = subprocess.Popen(
                [sys.executable, "-m", "controller", "--config", config, "train", "--epochs", "4", "--seed", "5"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                assert held.wait(), "the run never reached its second task"
                process.send_signal(signal.SIGINT)
                _, err = process.communicate(timeout=60)
            finally:
                process.kill()
        interrupted = next(r for r in store.runs.all(limit=2) if r.id != whole.run.id)
        assert process.returncode == 130, err
        run = store.runs.get(interrupted.id)
        assert run.state == "interrupted" and run.epochs_done == 1
        assert f"cluster train --resume {run.id}" in err

        resumed = json.loads(cli("--config", config, "train", "--resume", run.id, "--json").stdout)
        assert resumed["state"] == "completed" and resumed["epochs_done"] == 4
        assert [e["epoch"] for e in resumed["epochs"]] == list(range(1, 5))
        final = load_checkpoint(store.checkpoints.load(run.id)[1])["model"]
        reference = load_checkpoint(store.checkpoints.load(whole.run.id)[1])["model"]
        assert all(torch.equal(final[k], reference[k]) for k in reference)


@pytest.fixture(scope="class")
def controller_killed_mid_run(cluster, tmp_path_factory):
    """The class's cluster, its controller SIGKILLed while a `cluster train` held its second task:
    (cluster, the run's exit code, its stderr)."""
    controller = cluster.status().controller["pid"]
    code, err = TestWorkThatCannotFinish.run_held_at_its_second_task(
        cluster, tmp_path_factory.mktemp("held"), cluster.config.source, lambda: os.kill(controller, signal.SIGKILL)
    )
    return cluster, code, err


class TestWorkThatCannotFinish:
    """A run never waits forever: it ends with a clear error and a resume hint, and keeps what it had."""

    @staticmethod
    def run_held_at_its_second_task(cluster: Cluster, folder: Path, config: Path, fault) -> tuple[int, str]:
        """`cluster train --epochs 5` in a subprocess; ``fault()`` strikes while an engine holds epoch 2."""
        with engines_holding_tasks(cluster.client, folder, when="checkpoint is not None") as held:
            process = subprocess.Popen(
                [sys.executable, "-m", "controller", "--config", config, "train", "--epochs", "5"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert process.stderr is not None  # stderr=PIPE
            try:
                assert held.wait(process=process), f"the run never reached its second task: {process.stderr.read()}"
                fault()
                _, err = process.communicate(timeout=90)
            finally:
                process.kill()
        return process.returncode, err

    @staticmethod
    def assert_interrupted_with_hint(store: Store, err: str) -> None:
        run = store.runs.all(limit=1)[0]
        assert run.state == "interrupted" and run.epochs_done == 1, run
        assert f"continue it with `cluster train --resume {run.id}`" in err, err

    def test_a_dead_controller_ends_the_run_at_once(self, controller_killed_mid_run):
        cluster, code, err = controller_killed_mid_run
        assert code == 3 and "error: the cluster's controller died" in err, err
        self.assert_interrupted_with_hint(cluster.store, err)
        assert "`cluster start` (it adopts the slaves still up), then continue it with" in err, err

    def test_a_crashed_controller_shows_in_status_and_stop_still_cleans_up(self, controller_killed_mid_run):
        cluster = controller_killed_mid_run[0]
        status = wait_until(lambda: (s := cluster.status()).state == "failed" and s, timeout=10)
        assert status and status.controller["state"] == "dead"
        cluster.stop()
        state_dir = cluster.config.state_dir
        assert wait_until(lambda: not cluster_pids(state_dir), timeout=20), cluster_pids(state_dir)
        assert cluster.status().state == "stopped"

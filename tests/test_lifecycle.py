"""Lifecycle and status of a cluster, at the level of the store and the processes it names.

The whole path (a real controller and engines) is in tests/test_cluster.py; here a plain process
carrying a cluster's marker stands for its controller, so the rules around it are cheap to pin down:
one live cluster per name, what status shows once the controller is gone, what stop returns.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from controller.api import Cluster
from controller.cluster.lifecycle import Lifecycle, Stopped, adoption_message, check_autoscaling, threads_per_engine
from controller.cluster.status import controller_lost_hint
from controller.config import load_config, override
from controller.errors import AlreadyRunningError, UsageError
from controller.ipp import processes
from controller.store import EngineRecord, NodeRecord, RunRecord


@pytest.fixture
def cluster(tmp_path):
    ini = tmp_path / "cluster.ini"
    ini.write_text(f"[cluster]\nname = c\nstate_dir = {tmp_path / 'state'}\n")
    with Cluster(load_config(ini, environ={})) as cluster:
        yield cluster


@pytest.fixture
def stand_in():
    """Start a process marked as a cluster's controller (``stand_in(profile, cluster_id)`` -> Popen)."""
    started: list[subprocess.Popen] = []

    def start(profile: Path, ipp_cluster_id: str) -> subprocess.Popen:
        env = {**os.environ, **processes.process_marker(profile, ipp_cluster_id)}
        process = subprocess.Popen(["sleep", "300"], env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def recorded(cluster: Cluster, state: str = "running", controller_pid=None):
    """A cluster row as `start` leaves it, with one node and one engine."""
    store = cluster.store
    profile = Path(cluster.config.state_dir) / "profile"
    record = store.clusters.create(
        name=cluster.name,
        provider="local",
        slaves=1,
        threads_per_engine=1,
        profile_dir=str(profile),
        ipp_cluster_id="c-1",
    )
    store.clusters.update(record.id, controller_pid=controller_pid)
    store.clusters.set_state(record.id, state)
    store.nodes.put(record.id, NodeRecord(node_id="local-1", provider="local", host="h", state="running", engines=1))
    store.engines.put(
        record.id, [EngineRecord(engine_id=0, host="h", pid=2**22 + 1, device="cpu", threads=1, node_id="local-1")]
    )
    return store.clusters.get(record.id)


class TestOneClusterPerName:
    def test_a_second_start_is_refused_while_the_controller_lives(self, cluster, stand_in):
        record = recorded(cluster, controller_pid=None)
        controller = stand_in(Path(record.profile_dir), record.ipp_cluster_id)
        cluster.store.clusters.update(record.id, controller_pid=controller.pid)
        with pytest.raises(AlreadyRunningError, match="cluster 'c' is already running .* run `cluster stop` first"):
            cluster.start(slaves=1)
        assert [c.id for c in cluster.store.clusters.all()] == [record.id], "nothing new was recorded"
        assert controller.poll() is None, "the running cluster was left alone"

    def test_what_is_left_of_a_cluster_whose_controller_died_is_stopped_first(self, cluster, stand_in):
        record = recorded(cluster)
        controller = stand_in(Path(record.profile_dir), record.ipp_cluster_id)
        cluster.store.clusters.update(record.id, controller_pid=controller.pid)
        controller.kill()
        controller.wait()
        Lifecycle(cluster.config, cluster.store, cluster.provider, cluster.run_spec).refuse_second_cluster()
        left = cluster.store.clusters.get(record.id)
        assert left.state == "stopped" and left.stopped_at
        assert [n.state for n in cluster.store.nodes.of(record.id)] == ["stopped"]

    def test_autoscaling_bounds_are_checked_before_anything_starts(self, cluster):
        with pytest.raises(UsageError, match="slaves = 5 must lie between min_slaves = 1 and max_slaves = 4"):
            check_autoscaling(override(cluster.config.cluster, "t", slaves=5, min_slaves=1, max_slaves=4))
        check_autoscaling(override(cluster.config.cluster, "t", slaves=5))  # max_slaves 0: no autoscaling

    def test_local_engines_share_the_masters_cores_and_remote_ones_use_their_own(self, cluster):
        local = override(cluster.config.cluster, "t", slaves=2, provider="local")
        assert threads_per_engine(local) == max(1, (os.cpu_count() or 1) // 2)
        assert threads_per_engine(override(local, "t", provider="ssh")) == 0
        assert threads_per_engine(override(local, "t", threads_per_engine=3)) == 3


class TestStatus:
    def test_a_name_never_started_is_none_and_a_stopped_one_keeps_its_error(self, cluster):
        assert cluster.status().state == "none"
        record = recorded(cluster)
        cluster.store.clusters.set_state(record.id, "stopped", error="start failed: boom")
        status = cluster.status()
        assert (status.state, status.error) == ("stopped", "start failed: boom")

    def test_after_the_controller_died_status_is_failed_and_says_what_to_resume(self, cluster):
        record = recorded(cluster, controller_pid=None)
        cluster.store.runs.create(RunRecord(id="r-1", params={}, cluster_id=record.id))
        cluster.store.runs.create(RunRecord(id="r-2", params={}, cluster_id=record.id, sweep_id="s-1"))
        cluster.store.runs.create(RunRecord(id="r-3", params={}, cluster_id=record.id, state="completed"))
        status = cluster.status()
        assert status.state == "failed" and status.controller == {"pid": None, "state": "dead"}
        assert [(e.id, e.state, e.node_id) for e in status.engines] == [(0, "dead", "local-1")]
        assert status.hint == (
            "the controller is gone (the master restarted, or it was killed); run `cluster start` "
            "(it starts the engines again for this cluster), then `cluster sweep --resume s-1` "
            "and `cluster train --resume r-1`"
        )

    def test_the_hint_counts_remote_nodes_still_billed(self, cluster):
        record = recorded(cluster)
        nodes = [
            NodeRecord(node_id="i-1", provider="aws", state="running"),
            NodeRecord(node_id="i-2", provider="aws", state="terminated"),
        ]
        hint = controller_lost_hint(cluster.config, cluster.store, dataclasses.replace(record, provider="aws"), nodes)
        assert "1 node(s) still up and billed; their engines wait" in hint
        assert hint.endswith(
            "run `cluster start` (it adopts them: a new controller, new engines on the same slaves); "
            "`cluster start --fresh` releases them and starts new ones, `cluster stop` ends them"
        )

    def test_an_engine_of_a_released_node_is_shown_removed_and_does_not_degrade_the_cluster(self, cluster, stand_in):
        record = recorded(cluster)
        controller = stand_in(Path(record.profile_dir), record.ipp_cluster_id)
        cluster.store.clusters.update(record.id, controller_pid=controller.pid)
        cluster.store.nodes.update(record.id, "local-1", state="stopped")
        status = cluster.status()
        assert [e.state for e in status.engines] == ["removed"]
        assert status.state == "running" and status.current == 0


class TestWhatStartAdopts:
    """After the master restarted, `start` adopts a running cluster whose controller is gone and whose
    provider still sees a node up; anything else is cleaned up and started afresh, as before."""

    @staticmethod
    def lifecycle(cluster: Cluster) -> Lifecycle:
        return Lifecycle(cluster.config, cluster.store, cluster.provider, cluster.run_spec)

    def test_a_running_cluster_with_its_controller_gone_and_a_node_up_is_adopted(self, cluster):
        record = recorded(cluster)
        cluster.store.nodes.put(record.id, NodeRecord(node_id="local-0", provider="local", state="stopped"))
        found, nodes = self.lifecycle(cluster).adoptable(cluster.config.cluster)
        assert found.id == record.id and [n.node_id for n in nodes] == ["local-1"]  # the released one is not

    def test_a_live_controller_a_start_or_stop_cut_short_and_another_provider_are_not_adopted(self, cluster, stand_in):
        record = recorded(cluster)
        lifecycle = self.lifecycle(cluster)
        assert lifecycle.adoptable(override(cluster.config.cluster, "t", provider="ssh")) is None
        for state in ("starting", "stopping", "failed"):
            cluster.store.clusters.set_state(record.id, state)
            assert lifecycle.adoptable(cluster.config.cluster) is None, state
        cluster.store.clusters.set_state(record.id, "running")
        controller = stand_in(Path(record.profile_dir), record.ipp_cluster_id)
        cluster.store.clusters.update(record.id, controller_pid=controller.pid)
        assert lifecycle.adoptable(cluster.config.cluster) is None  # `start` refuses it instead

    def test_no_node_up_is_nothing_to_adopt(self, cluster):
        record = recorded(cluster)
        cluster.store.nodes.update(record.id, "local-1", state="stopped")
        assert self.lifecycle(cluster).adoptable(cluster.config.cluster) is None

    def test_what_start_says_it_adopted_lost_added_and_kept(self):
        def node(node_id: str, provider: str = "aws") -> NodeRecord:
            return NodeRecord(node_id=node_id, provider=provider, state="running")

        nodes = [node("i-1"), node("i-2"), node("i-3")]
        assert (
            adoption_message("c", nodes, nodes[:2], [node("i-4")], 3)
            == "adopted 2 slave(s) of cluster 'c' still up: i-1, i-2; lost i-3; added i-4"
        )
        assert (
            adoption_message("c", nodes, nodes, [], 1)
            == "adopted 3 slave(s) of cluster 'c' still up: i-1, i-2, i-3; kept all 3 (asked for 1; "
            "`cluster scale 1` turns the rest off)"
        )
        local = [node("local-1", "local")]
        assert (
            adoption_message("c", local, [], [node("local-2", "local")], 1)
            == "restarted the engines of cluster 'c' (local engines do not outlive their master); added local-2"
        )


def test_a_marked_process_is_known_as_ours_as_soon_as_popen_returns(tmp_path):
    """Popen returns once exec has closed the fds, before the kernel has written the new environment: right
    after it, /proc/PID/environ read empty for 1085 of 2000 spawns on a loaded machine, and a controller just
    started looked dead (a second `start` was let through). The check reads again while it is empty."""
    profile = tmp_path / "profile"
    env = {**os.environ, **processes.process_marker(profile, "c-1")}
    for _ in range(200):
        process = subprocess.Popen(["sleep", "30"], env=env)
        try:
            assert processes.is_marked(process.pid, profile, "c-1")
        finally:
            process.kill()
            process.wait()


def test_stop_with_nothing_running_returns_an_empty_stopped(cluster):
    stopped = cluster.stop()
    assert stopped == Stopped() and not stopped
    assert stopped.to_dict() == {"stopped": False, "cluster": None, "released": []}


class ControllerStarts:
    """An ipyparallel Cluster as far as ``start_controller`` uses it. Each start runs the next of
    ``scripts`` as a real process (shell), its output in a log file as ipyparallel's launcher keeps it: the
    port race that makes a real controller exit cannot be produced at will, so a script stands for it."""

    def __init__(self, profile: Path, scripts: list[str]):
        self.profile_dir, self.cluster_id = str(profile), "c-1"
        self.scripts, self.controller, self.started = list(scripts), None, 0
        (profile / "security").mkdir(parents=True)

    def start_controller_sync(self):
        self.started += 1
        log = Path(self.profile_dir) / f"controller-{self.started}.log"
        engine_json = Path(self.profile_dir) / "security" / f"ipcontroller-{self.cluster_id}-engine.json"
        script = self.scripts.pop(0).format(engine_json=engine_json)
        with open(log, "w") as output:
            process = subprocess.Popen(["sh", "-c", script], stdout=output, stderr=subprocess.STDOUT)
        self.controller = dataclasses.make_dataclass("Launcher", ["pid", "process", "log"])(process.pid, process, log)
        self.controller.get_output = lambda: self.controller.log.read_text()

    def stop_controller_sync(self):
        if self.controller is not None and self.controller.process.poll() is None:
            self.controller.process.kill()
        self.controller.process.wait()
        self.controller = None


PORT_TAKEN = "echo 'zmq.error.ZMQError: Address already in use (addr=tcp://127.0.0.1:50001)'; exit 1"
LISTENS = "echo '{{}}' > {engine_json}; exec sleep 60"


class TestTheControllerStart:
    def test_a_controller_that_lost_a_port_it_had_picked_is_started_again(self, tmp_path, caplog):
        from controller.ipp.launch import start_controller

        cluster = ControllerStarts(tmp_path, [PORT_TAKEN, LISTENS])
        pids = []
        try:
            start_controller(cluster, timeout=30, on_start=pids.append)
            assert cluster.started == 2 and pids[-1] == cluster.controller.pid and len(pids) == 2
            assert "could not bind a port it had picked" in caplog.text
        finally:
            cluster.stop_controller_sync()

    def test_a_controller_that_exits_for_another_reason_is_an_error_with_its_last_words_at_once(self, tmp_path):
        from controller.errors import ProviderError
        from controller.ipp.launch import start_controller

        cluster = ControllerStarts(tmp_path, ["echo 'Traceback: ValueError: bad config'; exit 2", LISTENS])
        with pytest.raises(ProviderError, match=r"exited as it started: Traceback: ValueError: bad config"):
            start_controller(cluster, timeout=30)
        assert cluster.started == 1 and cluster.controller is None

    def test_a_port_lost_every_time_ends_after_three_starts(self, tmp_path):
        from controller.errors import ProviderError
        from controller.ipp.launch import start_controller

        cluster = ControllerStarts(tmp_path, [PORT_TAKEN] * 3)
        with pytest.raises(ProviderError, match="Address already in use"):
            start_controller(cluster, timeout=30)
        assert cluster.started == 3

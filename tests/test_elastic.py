"""An elastic cluster: `scale`, `remove`, the keeper that replaces lost slaves and autoscales.

The policy is tested as a pure function (a fake clock, no process); everything else runs on real local
clusters (controller, engines, the keeper process).  Faults happen at fixed points: a task that holds at a
known step until a drain reaches it, a held training task, a kill -9 of a known engine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import Optional

import ipyparallel as ipp
import pytest

from controller.api import Cluster
from controller.cluster.policy import NodeView, Policy, Snapshot
from controller.cluster.resize import resize_lock
from controller.config import load_config
from controller.errors import ClusterStateError, ConfigError, UsageError
from controller.store import EngineRecord, Store
from controller.work.jobs import Job, JobSource
from controller.work.roster import StoreRoster
from engines.spec import TaskResult
from tests.helpers import REPO, cluster_pids, engines_holding_tasks, make_config, wait_until, write_ini


# the policy --------------------------------------------------------------------------------------------
def node(node_id: str, alive: int = 1, busy: bool = False, notice: bool = False, state: str = "running") -> NodeView:
    return NodeView(node_id=node_id, engines=1, alive=alive, busy=busy, notice=notice, instance_state=state)


def snap(now: float, nodes: list[NodeView], target: int = 2, **knobs) -> Snapshot:
    return Snapshot(now=now, target=target, nodes=nodes, **knobs)


class TestKeepingTheTargetCount:
    def test_a_node_whose_engines_died_is_released_and_replaced_once_it_stayed_dead(self):
        policy = Policy(lost_after_s=3)
        nodes = [node("a"), node("b", alive=0)]
        first = policy.decide(snap(100, nodes))
        assert not first.acts  # an engine that just went may be restarting
        later = policy.decide(snap(103, nodes))
        assert later.add == 1 and later.replaces == "b" and "engines died on b" in later.add_why
        assert [(r.node_id, r.drain) for r in later.release] == [("b", False)]

    def test_a_terminated_instance_is_replaced_at_once(self):
        decision = Policy().decide(snap(0, [node("a"), node("i-1", state="terminated")]))
        assert decision.add == 1 and "instance terminated on i-1" in decision.add_why

    def test_a_spot_notice_asks_for_a_replacement_at_once_and_drains_the_node(self):
        decision = Policy().decide(snap(0, [node("a"), node("b", busy=True, notice=True)]))
        assert decision.add == 1 and "spot notice on b" in decision.add_why
        assert [(r.node_id, r.drain) for r in decision.release] == [("b", True)]

    def test_nothing_is_replaced_with_replace_lost_off(self):
        policy = Policy(lost_after_s=0)
        decision = policy.decide(snap(0, [node("a"), node("b", alive=0)], replace_lost=False))
        assert not decision.acts

    def test_a_failed_add_is_tried_again_after_a_growing_backoff(self):
        policy = Policy(lost_after_s=0, backoff_s=10)
        nodes = [node("a"), node("b", state="terminated")]
        assert policy.decide(snap(0, nodes)).add == 1
        assert policy.add_failed(0) == 10
        assert policy.decide(snap(5, nodes)).add == 0
        assert policy.decide(snap(10, nodes)).add == 1
        assert policy.add_failed(10) == 30  # 10 s later, then 20 s


class TestAutoscaling:
    knobs = dict(min_slaves=1, max_slaves=4, idle_minutes=0.5)

    def test_waiting_jobs_turn_slaves_on_up_to_max(self):
        decision = Policy().decide(snap(0, [node("a", busy=True)], target=1, wanted=9, **self.knobs))
        assert decision.target == 4 and decision.add == 3
        assert "9 job(s) want engines, 1 slave(s) serve: target 1 -> 4" in decision.add_why

    def test_idle_slaves_stop_after_idle_minutes_down_to_min_and_not_below_the_demand(self):
        policy = Policy()
        nodes = [node("a"), node("b"), node("c", busy=True)]
        assert not policy.decide(snap(0, nodes, target=3, wanted=1, **self.knobs)).acts
        assert not policy.decide(snap(29, nodes, target=3, wanted=1, **self.knobs)).acts
        decision = policy.decide(snap(30, nodes, target=3, wanted=1, **self.knobs))
        assert decision.target == 1 and decision.add == 0
        assert sorted(r.node_id for r in decision.release) == ["a", "b"]
        assert all(r.drain and r.why.startswith("idle for 0.50 min") for r in decision.release)
        # two jobs want engines: one idle slave stays
        policy = Policy()
        policy.decide(snap(0, nodes, target=3, wanted=2, **self.knobs))
        assert [r.node_id for r in policy.decide(snap(30, nodes, target=3, wanted=2, **self.knobs)).release] == ["a"]

    def test_a_slave_that_worked_meanwhile_starts_its_idle_time_again(self):
        policy = Policy()
        policy.decide(snap(0, [node("a"), node("b")], target=2, **self.knobs))
        policy.decide(snap(20, [node("a", busy=True), node("b")], target=2, **self.knobs))
        decision = policy.decide(snap(30, [node("a"), node("b")], target=2, **self.knobs))
        assert [r.node_id for r in decision.release] == ["b"]


# configuration and the lock -------------------------------------------------------------------------------
def test_autoscaling_knobs_are_checked_with_one_clear_message(tmp_path, tiny_data_dir):
    ini = write_ini(tmp_path / "cluster.ini", "[cluster]\nidle_minutes = soon\n")
    with pytest.raises(ConfigError, match=r"\[cluster\] idle_minutes = 'soon': expected a number from 0.0"):
        load_config(ini, environ={})
    cluster = Cluster(make_config(tmp_path, tiny_data_dir, slaves=3, extra="max_slaves = 2"))
    with pytest.raises(UsageError, match="slaves = 3 must lie between min_slaves = 1 and max_slaves = 2"):
        cluster.start()
    assert cluster.status().state == "none"  # nothing was started
    cluster.close()


def test_masters_share_notices_and_their_demand_through_the_store(tmp_path):
    store = Store(tmp_path)
    record = store.clusters.create(
        name="t", provider="local", slaves=2, threads_per_engine=1, profile_dir="", ipp_cluster_id="t-1"
    )
    store.engines.put(record.id, [EngineRecord(engine_id=i, host="h", pid=1, device="cpu", threads=1) for i in (0, 1)])
    one, two = StoreRoster(store, record.id), StoreRoster(store, record.id)
    one.engine_leaving(0, "notice")
    one.engine_leaving(1, "drain")  # drains are marked (and called off) by the resize that started them
    assert store.engines.leaving(record.id) == {0: "notice"}
    one.report_demand(3)
    two.report_demand(2)
    assert store.demand.total(record.id, fresh_s=10) == 5
    one.report_demand(None)  # its scheduler ended
    assert store.demand.total(record.id, fresh_s=10) == 2
    store.execute("UPDATE demand SET at = at - 60")  # a master killed without a word: its report ages out
    assert store.demand.total(record.id, fresh_s=10) == 0
    store.close()


def test_one_resize_at_a_time_and_a_killed_holder_frees_the_lock(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from controller.cluster.resize import resize_lock
from engines.spec import TaskResult
with resize_lock(__import__("pathlib").Path({str(tmp_path)!r}), 7):
    print("held", flush=True)
    time.sleep(120)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ClusterStateError, match=rf"another resize of this cluster is running \(pid {holder.pid}"):
            with resize_lock(tmp_path, 7, wait_s=0):
                pass
    finally:
        holder.kill()
        holder.wait()
    with resize_lock(tmp_path, 7, wait_s=5):  # the kernel released it with its holder
        pass


# real clusters ------------------------------------------------------------------------------------------
@ipp.interactive  # shipped by value: the engines cannot import this test module
def stepping_task(spec, checkpoint, n_epochs):
    """A training task in miniature: ``steps`` steps an epoch, its state (epoch, step, and the pid that ran
    every step) as the checkpoint; it stops at a step boundary when asked, as engines/loop.py does. The
    first task holds before step ``hold_at`` until a stop request reaches it (at most two minutes)."""
    import json
    import os
    import time

    from engines.process import stopping

    state = json.loads(checkpoint) if checkpoint else {"epoch": 0, "step": 0, "ran": []}
    goal, hold = state["epoch"] + n_epochs, checkpoint is None

    def result(stopped=None):
        return {
            "checkpoint": json.dumps(state).encode(),
            "completed_epochs": state["epoch"],
            "epochs": [],
            "host": "h",
            "device": "cpu",
            "stopped": stopped,
        }

    while state["epoch"] < goal:
        if stopping.requested():
            return result(stopping.requested())
        if hold and state["step"] == spec["hold_at"]:
            hold = False
            with open(spec["held_file"], "w") as handle:
                handle.write(str(os.getpid()))
            deadline = time.monotonic() + 120
            while stopping.requested() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            continue
        state["ran"].append(os.getpid())
        state["step"] += 1
        if state["step"] == spec["steps"]:
            state["epoch"], state["step"] = state["epoch"] + 1, 0
    return result()


class OneJob(JobSource):
    """A JobSource of one job that keeps every result."""

    def __init__(self, job: Job):
        self.job, self.given = job, False
        self.results: list[tuple[Optional[int], TaskResult]] = []
        self.error: Optional[str] = None

    def next_job(self) -> Optional[Job]:
        if self.given:
            return None
        self.given = True
        return self.job

    def on_result(self, job: Job, result: TaskResult, engine_id: Optional[int]) -> bool:
        self.results.append((engine_id, result))
        return True

    def on_error(self, job: Job, error: BaseException, traceback: str) -> None:
        self.error = traceback

    def on_rollback(self, job: Job) -> None:
        raise AssertionError("no checkpoint is kept on an engine here")

    def exhausted(self) -> bool:
        return self.given


def in_thread(target) -> tuple[threading.Thread, dict]:
    """Run ``target`` in a thread (as another master would); what it returned or raised lands in the dict."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = target()
        except BaseException as error:  # noqa: BLE001 - the test asserts on it
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def stop_and_check(cluster: Cluster) -> None:
    state_dir = cluster.config.state_dir
    cluster.stop()
    cluster.close()
    assert wait_until(lambda: not cluster_pids(state_dir), timeout=30), f"left: {cluster_pids(state_dir)}"


def test_scale_up_during_a_sweep_then_down_mid_task(tmp_path, tiny_data_dir):
    """New engines take a running sweep's trials; a drained engine's task goes on elsewhere from its drain
    checkpoint, losing nothing."""
    config = make_config(tmp_path, tiny_data_dir, slaves=1)
    cluster = Cluster(config)
    cluster.start()
    try:
        # up: while engine 0 holds its trial, the two new engines take the others
        with engines_holding_tasks(cluster.client, tmp_path, when="True", targets=[0]) as held:
            thread, outcome = in_thread(lambda: Cluster(config).sweep({"hidden": [16, 24, 32]}, epochs=1))
            assert held.wait(timeout=60), outcome
            status = cluster.scale(3)
            new = {e.id for e in status.engines} - {0}
            assert len(new) == 2 and (status.target, status.current) == (3, 3)
            assert [n.node_id for n in status.nodes] == ["local-1", "local-2", "local-3"]
            assert wait_until(
                lambda: {r.engine_id for r in cluster.store.runs.all() if r.state == "completed"} & new, timeout=60
            ), outcome
        thread.join(timeout=120)
        trials = outcome["value"].trials
        assert [t.state for t in trials] == ["COMPLETE"] * 3
        used = {cluster.store.runs.get(t.run_id).engine_id for t in trials}
        assert 0 in used and used & new  # the held trial finished where it began

        # down: the job's first task holds at step 3 until the drain of its node reaches it
        held_file = tmp_path / "held"
        job = Job(
            run_id="r-steps",
            spec={"epochs": 2, "steps": 10, "hold_at": 3, "held_file": str(held_file)},
            task=stepping_task,
        )
        source = OneJob(job)

        def drive():
            with Cluster(config) as master:
                return master.scheduler().run(source)

        thread, outcome = in_thread(drive)
        assert wait_until(held_file.exists, timeout=60), outcome
        pid = int(held_file.read_text())
        engines = {e.pid: e for e in cluster.store.engines.of(cluster.record.id)}
        busy = engines[pid]
        status = cluster.remove([busy.node_id])
        thread.join(timeout=120)
        assert not thread.is_alive() and "error" not in outcome and source.error is None, outcome

        (first_engine, first), *rest = source.results
        assert first_engine == busy.engine_id and first.stopped == "drain"
        assert json.loads(first.checkpoint)["step"] == 3
        assert busy.engine_id not in {engine for engine, _ in rest}
        ran = json.loads(rest[-1][1].checkpoint)["ran"]
        assert len(ran) == 2 * 10  # every step once: nothing lost or redone beyond the drain checkpoint
        assert ran[:3] == [pid] * 3 and pid not in ran[3:]
        assert rest[-1][1].completed_epochs == 2

        # the store and status say what happened
        nodes = {n.node_id: n.state for n in status.nodes}
        assert nodes[busy.node_id] == "stopped" and sorted(nodes.values()) == ["running", "running", "stopped"]
        shown = {e.id: e for e in status.engines}
        assert shown[busy.engine_id].state == "removed" and shown[busy.engine_id].leaving == "drain"
        assert (status.target, status.current) == (2, 2)
        assert any(f"draining {busy.node_id}" in e.detail for e in status.events)
        assert not cluster.store.execute("SELECT 1 FROM demand").fetchall()  # the schedulers withdrew their demand
    finally:
        stop_and_check(cluster)


def test_a_killed_engine_is_replaced_by_the_keeper(tmp_path, tiny_data_dir):
    cluster = Cluster(make_config(tmp_path, tiny_data_dir, slaves=2, extra="replace_lost = true"))
    status = cluster.start()
    try:
        assert status.keeper["state"] == "running" and status.keeper["pid"] in cluster_pids(cluster.config.state_dir)
        victim = next(e for e in status.engines if e.node_id == "local-2")
        os.kill(victim.pid, signal.SIGKILL)

        def back_to_two():  # the replacement serves, and the lost node is released (after the add)
            now = cluster.status()
            settled = now.current == 2 and sum(e.state == "idle" for e in now.engines) == 2
            return now if settled and {n.node_id: n.state for n in now.nodes}["local-2"] == "stopped" else None

        status = wait_until(back_to_two, timeout=120)
        assert status, cluster.status()
        nodes = {n.node_id: n for n in status.nodes}
        assert nodes["local-2"].state == "stopped" and nodes["local-3"].state == "running"
        assert nodes["local-3"].note == "engines died on local-2"
        assert {e.id: e.state for e in status.engines}[victim.id] == "removed"
        # the keeper rebuilt ipyparallel's cluster from its file, which keeps no engine arguments: the
        # replacement still gets the first engines' (the master's grace, leaving at once when stopped)
        first, replacement = (next(e for e in status.engines if e.node_id == node) for node in ("local-1", "local-3"))
        assert engine_arguments(cluster, replacement.id) == engine_arguments(cluster, first.id)
        assert any("max_heartbeat_misses" in a for a in engine_arguments(cluster, replacement.id))
        assert any("joined" in e.detail and "(replacing local-2)" in e.detail for e in status.events)
        assert status.state == "running"
        # the keeper ends with the controller
        os.kill(status.controller["pid"], signal.SIGKILL)
        assert wait_until(lambda: cluster.status().keeper["state"] == "dead", timeout=30), cluster.status().keeper
    finally:
        stop_and_check(cluster)  # the keeper too: it carries the cluster's marker


def engine_arguments(cluster: Cluster, engine_id: int) -> list[str]:
    """An engine's command-line options (those after ``-m ipyparallel.engine``), as the engine itself got them:
    a local engine is forked from the cluster's fork server, so /proc shows the server's command line."""
    argv = cluster.client[engine_id].apply_sync(eval, "__import__('sys').argv")
    return [a for a in argv if a.startswith("--")]


def engines_up(cluster: Cluster) -> int:
    return sum(e.state in ("idle", "busy") for e in cluster.status().engines)


def test_idle_slaves_stop_and_waiting_jobs_turn_them_on_again(tmp_path, tiny_data_dir):
    config = make_config(tmp_path, tiny_data_dir, slaves=2, extra="min_slaves = 1\nmax_slaves = 2\nidle_minutes = 0.02")
    cluster = Cluster(config)
    cluster.start()
    try:
        assert wait_until(lambda: engines_up(cluster) == 1, timeout=90), cluster.status()
        status = cluster.status()
        assert status.target == 1 and any("idle for 0.02 min" in e.detail for e in status.events)
        (left,) = [e.id for e in status.engines if e.state == "idle"]
        with engines_holding_tasks(cluster.client, tmp_path, when="True", targets=[left]) as held:
            thread, outcome = in_thread(lambda: Cluster(config).sweep({"hidden": [16, 24]}, epochs=1))
            assert held.wait(timeout=60), outcome

            # two trials want engines: the keeper turns a slave on again (it may be idle and gone again
            # soon after its trial: the events, not a look at the engines, tell)
            def joined():
                details = [e.detail for e in cluster.store.events.latest(cluster.record.id, limit=50)]
                decided = [
                    i for i, d in enumerate(details) if "2 job(s) want engines, 1 slave(s) serve: target 1 -> 2" in d
                ]
                return decided and any("joined" in d for d in details[decided[0] :])

            assert wait_until(joined, timeout=120), cluster.status().events
        thread.join(timeout=120)
        assert [t.state for t in outcome["value"].trials] == ["COMPLETE"] * 2
    finally:
        stop_and_check(cluster)

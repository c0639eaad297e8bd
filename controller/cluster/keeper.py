"""The keeper: a small background process per cluster that holds it to its target size.

``cluster start`` spawns it (``python -m controller.cluster``) when ``[cluster] replace_lost`` or
autoscaling (``max_slaves`` > 0) is on.  It carries the cluster's process marker like the controller and
the engines, so ``cluster stop`` and the tests' leak checks find it; its pid is in the store; it ends by
itself once the controller is gone or the cluster is stopping; it logs to ``state_dir/keeper-<id>.log``.

Every tick (about a second) it takes a snapshot (nodes, engines alive and busy, spot notices, the jobs
the masters want to run), asks the policy (controller/cluster/policy.py) and acts through the resizer,
under the cluster's resize lock (a CLI ``scale`` in progress makes it skip the tick).  Every decision
goes to the store's events, with its reason, and to the log.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from controller.cluster.policy import Decision, NodeView, Policy, Snapshot
from controller.cluster.resize import Resizer, resize_lock
from controller.config import Config, config_from_dict, config_to_dict
from controller.errors import ClusterError, ClusterStateError
from controller.ipp import processes
from controller.ipp.client import busy_engines
from controller.ipp.launch import controller_alive
from controller.ipp.profile import REPO_ROOT
from controller.store import LIVE_NODE_STATES, PENDING_NODE_STATES, ClusterRecord, NodeState, Store

log = logging.getLogger(__name__)

TICK_S = 1.0
DEMAND_FRESH_S = 10.0  # a master that has not reported for this long (killed) wants nothing
CLOUD_LIST_EVERY_S = 15.0  # how often a cloud provider is asked for its instances' states


def spawn(config: Config, record: ClusterRecord, store: Store) -> int:
    """Start the keeper of ``record`` in its own session and record its pid; returns the pid."""
    with _keeper_lock(Path(config.state_dir), record.id):
        return _spawn(config, record, store)


def revive(state_dir: Path, store: Store, record: ClusterRecord) -> Optional[int]:
    """Start the keeper of a running cluster again if it died (killed, out of memory); its pid, or None
    when there was nothing to do: no keeper wanted, still alive, or the cluster not running.

    The API calls it whenever it looks at a running cluster (status, and every command that talks to the
    controller), so a dead keeper costs at most the time until the next command. The spec ``spawn``
    wrote is the keeper's whole input, so the new one holds the cluster to the same knobs.
    """
    spec = Path(state_dir) / f"keeper-{record.id}.json"
    if not spec.exists():  # started without replace_lost or autoscaling: no keeper wanted
        return None
    with _keeper_lock(Path(state_dir), record.id):
        record = store.clusters.get(record.id)
        if record.state != "running" or not controller_alive(record):
            return None  # the keeper ends with the cluster; stop or a dead controller is not its death
        if record.keeper_pid and processes.is_marked(record.keeper_pid, Path(record.profile_dir),
                                                     record.ipp_cluster_id):
            return None
        pid = _spawn(config_from_dict(json.loads(spec.read_text())["config"]), record, store)
        store.events.add(record.id, "keeper", f"the keeper (pid {record.keeper_pid}) had died; started it again "
                                              f"(pid {pid})")
        log.warning("the keeper of cluster %s (pid %s) had died; started it again (pid %d)",
                    record.id, record.keeper_pid, pid)
        return pid


def forget(state_dir: Path, cluster_id: int) -> None:
    """No keeper is wanted for this cluster any more (an adopting start without replace_lost or autoscaling):
    drop the spec ``revive`` would start one from."""
    (Path(state_dir) / f"keeper-{cluster_id}.json").unlink(missing_ok=True)


@contextlib.contextmanager
def _keeper_lock(state_dir: Path, cluster_id: int) -> Iterator[None]:
    """Held while a keeper is started and its pid recorded: two commands that find it dead at once start
    one, and a new keeper (its first look revives a dead one) never sees a pid not yet recorded."""
    with open(state_dir / f"keeper-{cluster_id}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _spawn(config: Config, record: ClusterRecord, store: Store) -> int:
    state_dir = Path(config.state_dir)
    spec = state_dir / f"keeper-{record.id}.json"
    fd = os.open(spec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"cluster_id": record.id, "config": config_to_dict(config)}, handle)
    env = {**os.environ, **processes.process_marker(Path(record.profile_dir), record.ipp_cluster_id)}
    with open(state_dir / f"keeper-{record.id}.log", "ab") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "controller.cluster", str(spec)],
                                   stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=str(REPO_ROOT), env=env)
    store.clusters.update(record.id, keeper_pid=process.pid)
    log.info("keeper of cluster %s started (pid %d)", record.id, process.pid)
    return process.pid


def stop(record: ClusterRecord) -> None:
    """End the keeper before the cluster is torn down (it would replace the engines being stopped)."""
    if record.keeper_pid and processes.is_marked(record.keeper_pid, Path(record.profile_dir), record.ipp_cluster_id):
        processes.kill_process_group(record.keeper_pid)


class Keeper:
    """One cluster's keeper loop; ``tick`` is one look-decide-act step (tests call it directly)."""

    def __init__(self, cluster, cluster_id: int, policy: Optional[Policy] = None,
                 clock: Callable[[], float] = time.time):
        self.cluster = cluster  # controller.api.Cluster
        self.store = cluster.store
        self.cluster_id = cluster_id
        self.policy = policy or Policy()
        self.clock = clock
        self._instance_states: dict[str, str] = {}
        self._failing: dict[str, str] = {}
        self._listed_at = float("-inf")

    def alive(self) -> bool:
        """False once the cluster is stopping or its controller is gone: the keeper then ends."""
        record = self.store.clusters.get(self.cluster_id)
        if record.state in ("stopping", "stopped", "failed"):
            return False
        return record.state == "starting" or controller_alive(record)

    def tick(self) -> Optional[Decision]:
        """Look, decide, act; None when another resize holds the lock or the cluster is not running."""
        record = self.store.clusters.get(self.cluster_id)
        if record.state != "running":
            return None
        try:
            with resize_lock(self.cluster.config.state_dir, self.cluster_id, wait_s=0):
                decision = self.policy.decide(self.snapshot(record))
                self.act(record, decision)
                return decision
        except ClusterStateError as error:
            if "another resize" in str(error):
                return None
            raise

    def snapshot(self, record: ClusterRecord) -> Snapshot:
        client = self.cluster.client
        registered = set(client.ids)
        busy = busy_engines(client)
        leaving = self.store.engines.leaving(record.id)
        engines = self.store.engines.of(record.id)
        states, failing = self._states(record)
        views = []
        for node in self.store.nodes.of(record.id):
            if node.state not in LIVE_NODE_STATES or node.state in PENDING_NODE_STATES:
                continue
            mine = [e for e in engines if e.node_id == node.node_id]
            views.append(NodeView(
                node_id=node.node_id, engines=node.engines or len(mine),
                alive=sum(e.engine_id in registered for e in mine),
                busy=any(e.engine_id in busy for e in mine),
                notice=any(leaving.get(e.engine_id) == "notice" for e in mine),
                instance_state=states.get(node.node_id, node.state), failing=failing.get(node.node_id, ""),
                launched_at=node.launched_at))
            idle_since = self.policy.idle_since.get(node.node_id)
            if idle_since != node.idle_since:
                self.store.nodes.update(record.id, node.node_id, idle_since=idle_since)
        per_node = [v.engines for v in views if v.engines]
        return Snapshot(
            now=self.clock(), target=record.target if record.target is not None else record.slaves, nodes=views,
            wanted=self.store.demand.total(record.id, DEMAND_FRESH_S),
            engines_per_node=max(1, round(sum(per_node) / len(per_node))) if per_node else 1,
            min_slaves=record.min_slaves or 0, max_slaves=record.max_slaves or 0,
            idle_minutes=record.idle_minutes or 0.0, replace_lost=bool(record.replace_lost))

    def _states(self, record: ClusterRecord) -> tuple[dict[str, str], dict[str, str]]:
        """Node id -> the provider's word on it, and node id -> the health check it fails (a cloud is asked
        every CLOUD_LIST_EVERY_S at most)."""
        if record.provider in ("local", "ssh"):
            return {}, {}
        now = time.monotonic()
        if now - self._listed_at >= CLOUD_LIST_EVERY_S:
            self._listed_at = now
            provider = self.cluster.provider(record.provider)
            try:
                self._instance_states = {n.node_id: n.state for n in provider.list(record)}
                self._failing = provider.failing_health_checks(record)
            except ClusterError as error:
                log.warning("could not list the cluster's instances: %s", error)
        return self._instance_states, self._failing

    def refresh(self) -> None:
        """Ask the cloud again at the next tick (a test, or a notice that wants a fresh look)."""
        self._listed_at = float("-inf")

    def act(self, record: ClusterRecord, decision: Decision) -> None:
        if decision.target != (record.target if record.target is not None else record.slaves):
            self.store.clusters.update(record.id, target=decision.target)
            self.store.events.add(record.id, "scale", decision.target_why)
            log.info("%s", decision.target_why)
        resizer = Resizer(self.cluster)
        if decision.add:
            try:
                resizer.add(decision.add, decision.add_why, replaces=decision.replaces)
                self.policy.add_succeeded()
            except ClusterError as error:
                retry = self.policy.add_failed(self.clock())
                self.store.events.add(record.id, "error", f"adding {decision.add} slave(s) failed: {error}; "
                                     f"next try in {retry - self.clock():.0f} s")
                log.warning("adding %d slave(s) failed: %s", decision.add, error)
        nodes = {n.node_id: n for n in self.store.nodes.of(record.id)}
        for release in decision.release:
            node = nodes.get(release.node_id)
            if node is None:
                continue
            if not release.drain:
                for engine in self.store.engines.of(record.id):
                    if engine.node_id == node.node_id:
                        self.store.engines.mark_leaving(record.id, engine.engine_id, "lost")
                self.store.nodes.update(record.id, node.node_id, state=NodeState.LOST)
                node.state = NodeState.LOST
            try:
                resizer.remove([node], release.why, drain=release.drain)
            except ClusterError as error:
                self.store.events.add(record.id, "error", f"releasing {node.node_id} failed: {error}")
                log.warning("releasing %s failed: %s", node.node_id, error)

    def run(self, stop: threading.Event, tick_s: float = TICK_S) -> None:
        while not stop.is_set() and self.alive():
            started = time.monotonic()
            try:
                self.tick()
            except Exception as error:  # noqa: BLE001 - one bad tick must not end the keeper
                log.exception("keeper tick failed")
                try:
                    self.store.events.add(self.cluster_id, "error", f"keeper: {type(error).__name__}: {error}")
                except Exception:  # noqa: BLE001 - the store itself may be the problem
                    pass
            stop.wait(max(0.0, tick_s - (time.monotonic() - started)))
        log.info("keeper of cluster %s ends", self.cluster_id)


def end_with_the_controller(record: ClusterRecord, check_s: float = 1.0) -> threading.Thread:
    """A thread that ends this process once the controller is gone: ipyparallel's client waits for a
    dead controller's replies forever, so the loop itself may never get to notice."""
    profile = Path(record.profile_dir)

    def watch() -> None:
        while processes.is_marked(record.controller_pid, profile, record.ipp_cluster_id):
            time.sleep(check_s)
        log.info("the controller (pid %s) is gone; the keeper ends", record.controller_pid)
        logging.shutdown()
        os._exit(0)

    thread = threading.Thread(target=watch, name="controller-watch", daemon=True)
    thread.start()
    return thread

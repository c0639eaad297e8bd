"""The keeper's loop, in its own process (``python -m controller.cluster.keeper_loop SPEC``, started by
controller/cluster/keeper.py).

Every tick (about a second) it takes a snapshot (nodes, engines alive and busy, spot notices, the jobs
the masters want to run), asks the policy (controller/cluster/policy.py) and acts through the resizer,
under the cluster's resize lock (a CLI ``scale`` in progress makes it skip the tick).  Every decision
goes to the store's events, with its reason, and to the log. It works on a :class:`ClusterHandle` (the
cluster as the layers below the API use it), never on the API's ``Cluster``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from controller.cluster.handle import ClusterHandle
from controller.cluster.policy import Decision, NodeView, Policy, Snapshot
from controller.cluster.resize import ResizeHost, Resizer, resize_lock
from controller.config import config_from_dict
from controller.errors import ClusterError, ClusterStateError
from controller.ipp.client import busy_engines
from controller.ipp.launch import controller_alive
from controller.ipp.processes import is_marked
from controller.store import LIVE_NODE_STATES, PENDING_NODE_STATES, ClusterRecord, NodeState

log = logging.getLogger(__name__)

TICK_S = 1.0
DEMAND_FRESH_S = 10.0  # a master that has not reported for this long (killed) wants nothing
CLOUD_LIST_EVERY_S = 15.0  # how often a cloud provider is asked for its instances' states


class Keeper:
    """One cluster's keeper loop; ``tick`` is one look-decide-act step (tests call it directly)."""

    def __init__(
        self,
        cluster: ResizeHost,
        cluster_id: int,
        policy: Optional[Policy] = None,
        clock: Callable[[], float] = time.time,
    ):
        self.cluster = cluster
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
            views.append(
                NodeView(
                    node_id=node.node_id,
                    engines=node.engines or len(mine),
                    alive=sum(e.engine_id in registered for e in mine),
                    busy=any(e.engine_id in busy for e in mine),
                    notice=any(leaving.get(e.engine_id) == "notice" for e in mine),
                    instance_state=states.get(node.node_id, node.state),
                    failing=failing.get(node.node_id, ""),
                    launched_at=node.launched_at,
                )
            )
            idle_since = self.policy.idle_since.get(node.node_id)
            if idle_since != node.idle_since:
                self.store.nodes.update(record.id, node.node_id, idle_since=idle_since)
        per_node = [v.engines for v in views if v.engines]
        return Snapshot(
            now=self.clock(),
            target=record.target if record.target is not None else record.slaves,
            nodes=views,
            wanted=self.store.demand.total(record.id, DEMAND_FRESH_S),
            engines_per_node=max(1, round(sum(per_node) / len(per_node))) if per_node else 1,
            min_slaves=record.min_slaves or 0,
            max_slaves=record.max_slaves or 0,
            idle_minutes=record.idle_minutes or 0.0,
            replace_lost=bool(record.replace_lost),
        )

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
                self.store.events.add(
                    record.id,
                    "error",
                    f"adding {decision.add} slave(s) failed: {error}; next try in {retry - self.clock():.0f} s",
                )
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
        while is_marked(record.controller_pid, profile, record.ipp_cluster_id):
            time.sleep(check_s)
        log.info("the controller (pid %s) is gone; the keeper ends", record.controller_pid)
        logging.shutdown()
        os._exit(0)

    thread = threading.Thread(target=watch, name="controller-watch", daemon=True)
    thread.start()
    return thread


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(argv[0]).read_text())
    stop_event = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: stop_event.set())
    with ClusterHandle(config_from_dict(spec["config"])) as cluster:
        end_with_the_controller(cluster.store.clusters.get(spec["cluster_id"]))
        Keeper(cluster, spec["cluster_id"]).run(stop_event)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

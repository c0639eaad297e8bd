"""Slaves as processes on the master: ipyparallel's own local engine launcher.

Every slave is one engine set of ipyparallel's cluster, named by its node id (local-1, local-2, ...), so
``cluster remove local-2`` stops exactly that set and the cluster file records which sets run.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Optional

import ipyparallel as ipp

from controller.ipp import forked_engines, processes
from controller.ipp.launch import engine_set_pids
from controller.ipp.profile import engine_args, engine_environment, profile_dir
from controller.providers.base import Provider, Resource
from controller.store import ClusterRecord, NodeRecord, NodeState

log = logging.getLogger(__name__)

NODE_ID = re.compile(r"^local-(\d+)$")


class LocalProvider(Provider):
    name = "local"
    STEPS = ("engine_set",)

    def start(self, cluster: ClusterRecord, ipp_cluster: ipp.Cluster, slaves: int) -> list[NodeRecord]:
        return self.add(cluster, ipp_cluster, slaves)

    def prepare(self, cluster: ClusterRecord) -> None:
        forked_engines.start_server(cluster.profile_dir, cluster.ipp_cluster_id, self._engine_environment(cluster))

    @staticmethod
    def _engine_environment(cluster: ClusterRecord) -> dict[str, str]:
        return {
            **engine_environment(cluster.threads_per_engine),
            **processes.process_marker(Path(cluster.profile_dir), cluster.ipp_cluster_id),
        }

    def add(self, cluster: ClusterRecord, ipp_cluster: ipp.Cluster, count: int) -> list[NodeRecord]:
        # never reuse a node id: a removed node's rows (and events naming it) stay in the store
        used = [int(m.group(1)) for n in self.store.nodes.of(cluster.id) for m in [NODE_ID.match(n.node_id)] if m]
        first = max(used, default=0) + 1
        environment = self._engine_environment(cluster)
        arguments = engine_args(self.config.cluster.master_grace_minutes)
        price = self.config.cluster.price_per_hour / max(1, cluster.target or cluster.slaves)
        nodes = []
        try:
            for number in range(first, first + count):
                node = NodeRecord(
                    node_id=f"local-{number}",
                    provider=self.name,
                    host=socket.gethostname(),
                    state=NodeState.STARTING,
                    market="local",
                    price_per_hour=price,
                    engines=1,
                    launched_at=time.time(),
                )
                self.store.nodes.put(cluster.id, node)
                nodes.append(node)
                ipp_cluster.start_engines_sync(
                    n=1, engine_set_id=node.node_id, environment=environment, engine_args=arguments
                )
                node.state = NodeState.RUNNING
                self.store.nodes.put(cluster.id, node)
                self.hooks.on_step("engine_set")
        except BaseException:
            self.remove(cluster, ipp_cluster, nodes)
            raise
        return nodes

    def adopt(self, cluster: ClusterRecord, ipp_cluster: ipp.Cluster, nodes: list[NodeRecord]) -> list[NodeRecord]:
        """Nothing worth keeping: local engines live on the master, so after a machine restart none is left and
        after a process restart the old ones only wait out their grace for a controller that is gone. The
        caller ended them with the old master's other processes, before the new controller (which carries
        the same marker) started; here their nodes are recorded stopped, and the caller starts fresh ones
        with ``add``."""
        now = time.time()
        for node in nodes:
            self.store.nodes.update(cluster.id, node.node_id, state=NodeState.STOPPED, terminated_at=now)
        return []

    def remove(self, cluster: ClusterRecord, ipp_cluster: Optional[ipp.Cluster], nodes: list[NodeRecord]) -> None:
        profile = Path(cluster.profile_dir)
        self._terminate_all(cluster, ipp_cluster, {n.node_id for n in nodes})
        for node in nodes:
            if ipp_cluster is not None and node.node_id in ipp_cluster.engines:
                try:
                    ipp_cluster.stop_engines_sync(node.node_id)
                except Exception:  # a crashed launcher must not keep the node's processes alive
                    log.warning("ipyparallel could not stop engine set %s cleanly", node.node_id, exc_info=True)
            # whatever the launcher missed: this node's engines by their recorded pids, if still ours
            for engine in self.store.engines.of(cluster.id):
                if engine.node_id == node.node_id and processes.is_marked(engine.pid, profile, cluster.ipp_cluster_id):
                    processes.kill_process_group(engine.pid)
            node.state, node.terminated_at = NodeState.STOPPED, time.time()
            self.store.nodes.update(cluster.id, node.node_id, state=node.state, terminated_at=node.terminated_at)

    @staticmethod
    def _terminate_all(cluster: ClusterRecord, ipp_cluster: Optional[ipp.Cluster], set_ids: set[str]) -> None:
        """Every engine of these sets told at once: ipyparallel stops the sets one by one, waiting for each
        engine to exit before it signals the next."""
        profile = Path(cluster.profile_dir)
        for pid, set_id in engine_set_pids(ipp_cluster).items():
            if set_id in set_ids and processes.is_marked(pid, profile, cluster.ipp_cluster_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    def stop(self, cluster: ClusterRecord, ipp_cluster: Optional[ipp.Cluster]) -> None:
        if ipp_cluster is not None and ipp_cluster.engines:
            self._terminate_all(cluster, ipp_cluster, set(ipp_cluster.engines))
            try:
                ipp_cluster.stop_engines_sync()
            except Exception:  # a crashed launcher must not stop the clean-up
                log.warning("ipyparallel could not stop the engines cleanly", exc_info=True)
        # whatever the launchers missed (a lost cluster file): the cluster's marked processes
        processes.kill_cluster_processes(Path(cluster.profile_dir), cluster.ipp_cluster_id)
        for node in self.store.nodes.of(cluster.id):
            if node.state != NodeState.STOPPED:
                node.state, node.terminated_at = NodeState.STOPPED, time.time()
                self.store.nodes.put(cluster.id, node)

    def list(self, cluster: ClusterRecord) -> list[NodeRecord]:
        return self.store.nodes.of(cluster.id)

    def _orphans(self, name: str, everything: bool) -> dict[int, str]:
        """pid -> cluster id of the processes this state_dir's clusters (of that name) left running.

        Found by the markers in their environment (controller.ipp.processes), which outlive the store:
        the profile they were started for and the cluster's ipyparallel id, ``<name>-<record id>``.
        """
        profile = profile_dir(self.config.state_dir)
        own = re.compile(r"^.+-\d+$" if everything else rf"^{re.escape(name)}-\d+$")
        found = {}
        for pid in processes.marked_processes(profile):
            cluster_id = processes.process_environment(pid).get(processes.CLUSTER_MARKER, "")
            if own.match(cluster_id):
                found[pid] = cluster_id
        return found

    def find_orphans(self, name: str, everything: bool = False, any_owner: bool = False) -> builtins.list[Resource]:
        return [
            Resource("process", str(pid), cluster_id.rsplit("-", 1)[0], socket.gethostname())
            for pid, cluster_id in self._orphans(name, everything).items()
        ]

    def release_orphans(
        self, name: str, everything: bool = False, any_owner: bool = False, only: Optional[set[str]] = None
    ) -> builtins.list[str]:
        """With the store lost: the cluster's controller, engines and helpers, by their process markers."""
        released = []
        for pid in self._orphans(name, everything):
            if only is None or str(pid) in only:
                processes.kill_process_group(pid)
                released.append(str(pid))
        return released

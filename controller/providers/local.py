"""Slaves as processes on the master: ipyparallel's own local engine launcher."""
from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Optional

import ipyparallel as ipp

from .. import processes
from ..store import ClusterRecord, NodeRecord
from .base import Provider

log = logging.getLogger(__name__)


class LocalProvider(Provider):
    name = "local"

    def start(self, cluster: ClusterRecord, ipp_cluster: ipp.Cluster, slaves: int) -> list[NodeRecord]:
        ipp_cluster.start_engines_sync(n=slaves)
        node = NodeRecord(
            node_id="local", provider=self.name, host=socket.gethostname(), state="running",
            market="local", price_per_hour=self.config.cluster.price_per_hour, engines=slaves,
            launched_at=time.time())
        self.store.record_node(cluster.id, node)
        return [node]

    def stop(self, cluster: ClusterRecord, ipp_cluster: Optional[ipp.Cluster]) -> None:
        if ipp_cluster is not None and ipp_cluster.engines:
            try:
                ipp_cluster.stop_engines_sync()
            except Exception:  # a crashed launcher must not stop the clean-up
                log.warning("ipyparallel could not stop the engines cleanly", exc_info=True)
        # whatever the launchers missed (a lost cluster file): the cluster's marked processes
        processes.kill_cluster_processes(Path(cluster.profile_dir), cluster.ipp_cluster_id)
        for node in self.store.nodes(cluster.id):
            node.state, node.terminated_at = "stopped", time.time()
            self.store.record_node(cluster.id, node)

    def list(self, cluster: ClusterRecord) -> list[NodeRecord]:
        return self.store.nodes(cluster.id)

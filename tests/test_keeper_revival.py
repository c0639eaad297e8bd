"""A keeper that dies (killed, out of memory) is started again by the next command that looks at the cluster,
and the new one holds the cluster to its target as the first did. Real local cluster and keeper processes."""

from __future__ import annotations

import os
import signal

from controller.cluster import keeper
from controller.ipp import processes
from controller.store import Store
from tests.helpers import cluster_pids, running_cluster, wait_until


def test_a_dead_keeper_is_started_again_once_and_replaces_a_lost_engine(tmp_path, tiny_data_dir):
    with running_cluster(tmp_path, tiny_data_dir, extra="replace_lost = true", slaves=1) as cluster:
        first = cluster.status().keeper["pid"]
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: not processes.pid_alive(first), timeout=30)

        status = cluster.status()
        revived = status.keeper["pid"]
        assert revived != first and status.keeper["state"] == "running"
        assert revived in cluster_pids(cluster.config.state_dir)  # it carries the marker: stop ends it
        assert any(e.kind == "keeper" and f"pid {first}" in e.detail for e in status.events)
        # a second look, or a look from another command at the same time, starts no other keeper
        record = cluster.store.clusters.active("test")
        assert keeper.revive(cluster.config.state_dir, cluster.store, record) is None
        assert cluster.status().keeper["pid"] == revived

        # the revived keeper does the first one's job: a killed engine's slave is replaced
        victim = status.engines[0]
        os.kill(victim.pid, signal.SIGKILL)

        def replaced():
            now = cluster.status()
            serving = [e for e in now.engines if e.state == "idle"]
            return now if now.current == 1 and serving and serving[0].node_id != victim.node_id else None

        assert wait_until(replaced, timeout=120), cluster.status()


def test_no_keeper_is_started_for_a_cluster_that_wants_none(tmp_path):
    """A cluster started without replace_lost or autoscaling has no keeper spec: nothing to revive, even
    while it runs with no keeper pid."""
    store = Store(tmp_path)
    record = store.clusters.create(
        name="test",
        provider="local",
        slaves=1,
        threads_per_engine=1,
        profile_dir=str(tmp_path / "profile"),
        ipp_cluster_id="test-1",
    )
    store.clusters.set_state(record.id, "running")
    assert keeper.revive(tmp_path, store, store.clusters.get(record.id)) is None
    assert store.clusters.get(record.id).keeper_pid is None and not store.events.latest(record.id)

"""Ctrl-C during `cluster scale` is prompt and leaves the cluster as it was.

A real SIGINT reaches the master at a fixed point, never after a sleep: while the resizer waits for new
engines that cannot all register (the provider is told to expect one more than it starts), and while a
drain waits for a task that holds until the test lets it go.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from controller.providers.local import LocalProvider
from controller.store import Store
from tests.helpers import cluster_pids, running_cluster, wait_until


def ctrl_c_when(condition, timeout: float = 120) -> dict:
    """SIGINT to this process (as a Ctrl-C would) once ``condition()`` holds; returns when it was sent."""
    sent: dict = {}

    def watch():
        if wait_until(condition, timeout=timeout, interval=0.05):
            sent["at"] = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()
    return sent


def node_states(cluster) -> dict[str, str]:
    """From a store of its own: the watcher thread may not share the master's SQLite connection."""
    with Store(cluster.config.state_dir) as store:
        record = store.clusters.latest(cluster.name)
        assert record is not None, "the cluster was never started"
        return {n.node_id: n.state for n in store.nodes.of(record.id)}


def hold_until(gate: Path) -> str:
    """Code for an engine: keeps it busy, deaf to the drain's stop request, until ``gate`` exists."""
    return f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.02)\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_data_dir):
    """Two local slaves, shared: each test checks that the interrupted resize left them exactly as they were."""
    with running_cluster(tmp_path_factory.mktemp("scale"), tiny_data_dir, slaves=2) as cluster:
        yield cluster


def serving(cluster) -> dict[str, str]:
    return {node: state for node, state in node_states(cluster).items() if state != "stopped"}


def test_ctrl_c_while_new_slaves_join_releases_them_and_the_cluster_serves_as_before(cluster, monkeypatch):
    # one engine more than the new slaves start: the resizer waits (until engine_timeout) for an engine
    # that never comes, so the Ctrl-C lands in that wait whatever the machine's speed
    monkeypatch.setattr(LocalProvider, "expected_engines", lambda self, nodes: sum(n.engines for n in nodes) + 1)
    first_pids = set(cluster_pids(cluster.config.state_dir))
    before, target = serving(cluster), cluster.store.clusters.latest("test").target
    known = set(node_states(cluster))
    sent = ctrl_c_when(
        lambda: sum(state == "running" for node, state in node_states(cluster).items() if node not in known) == 2
    )
    with pytest.raises(KeyboardInterrupt):
        cluster.scale(len(before) + 2)
    assert time.monotonic() - sent["at"] < 15

    states = node_states(cluster)
    assert serving(cluster) == before
    assert [states[n] for n in states if n not in known] == ["stopped", "stopped"], states
    assert cluster.store.clusters.latest("test").target == target  # the target stays what it was
    assert wait_until(lambda: set(cluster_pids(cluster.config.state_dir)) == first_pids, timeout=20), (
        f"the new slaves' engines are left: {set(cluster_pids(cluster.config.state_dir)) - first_pids}"
    )
    assert wait_until(lambda: len(cluster.client.ids) == len(before), timeout=20)  # the hub heard them go
    status = cluster.status()
    assert (status.state, status.current, len(status.engines)) == ("running", len(before), len(before))
    assert cluster.client[[e.id for e in status.engines]].apply_sync(sum, [40, 2]) == [42] * len(before)


def test_ctrl_c_during_a_drain_calls_it_off_and_both_slaves_serve_again(cluster, tmp_path):
    gate = tmp_path / "gate"
    before = serving(cluster)
    assert len(before) == 2
    engines = {e.node_id: e.engine_id for e in cluster.store.engines.of(cluster.record.id) if e.node_id in before}
    busy = cluster.client[list(engines.values())].execute(hold_until(gate), block=False)
    assert wait_until(
        lambda: all(cluster.client.queue_status().get(e, {}).get("queue") for e in engines.values()), timeout=30
    )
    sent = ctrl_c_when(lambda: "draining" in node_states(cluster).values())
    try:
        with pytest.raises(KeyboardInterrupt):
            cluster.scale(1)
        assert time.monotonic() - sent["at"] < 15
    finally:
        gate.touch()
    busy.get(timeout=60)

    record = cluster.store.clusters.latest("test")
    assert serving(cluster) == before
    assert cluster.store.engines.leaving(record.id) == {}  # every scheduler may send them work again
    assert record.target == 2
    assert any("called off" in e.detail for e in cluster.store.events.latest(record.id))
    # the drain's stop request was cleared on the engines too: a task that checks it runs to its end
    from engines.process.stopping import requested

    assert cluster.client[list(engines.values())].apply_sync(requested) == [None, None]

"""Adding and draining slaves of a running cluster (``cluster scale``, ``cluster remove``, the keeper).

Adding: the provider brings up nodes (``Provider.add``); their engines register, are recorded through the
one path every engine takes (which installs the drain handler) and load the data set. A scheduler already
running sends them work at once: its view names no targets unless some engine is leaving.

Draining: the nodes' engines are marked ``leaving = drain`` in the store (every scheduler stops sending
them work within about a second) and sent SIGUSR1 (their running task stops at its next batch boundary
with a checkpoint, which the scheduler sends on to another engine); once every one is idle, the provider
stops them and releases the nodes.  One resize at a time per cluster: a lock file under state_dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

from controller.cluster import joining
from controller.config import Config
from controller.errors import ClusterStateError, ProviderError, UsageError
from controller.ipp.client import busy_engines
from controller.ipp.launch import load_cluster
from controller.ipp.profile import secure_files
from controller.providers import Provider
from controller.store import LIVE_NODE_STATES, ClusterRecord, NodeRecord, NodeState, Store
from controller.work.jobs import ROSTER_CHECK_S

log = logging.getLogger(__name__)

LOCK_WAIT_S = 900.0


class ResizeHost(Protocol):
    """What resizing needs of the cluster (controller.api.Cluster provides it)."""

    store: Store

    @property
    def config(self) -> Config: ...

    @property
    def record(self) -> ClusterRecord: ...

    @property
    def client(self): ...

    def provider(self, name: Optional[str] = None) -> Provider: ...

    def run_spec(self, **overrides: Any) -> dict: ...


def lock_path(state_dir: Path, cluster_id: int) -> Path:
    return Path(state_dir) / f"resize-{cluster_id}.lock"


@contextlib.contextmanager
def resize_lock(state_dir: Path, cluster_id: int, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the cluster's resize lock (an flock: released by the kernel when its holder dies, kill -9 too).

    ``wait_s`` 0: raise at once when another resize holds it."""
    path = lock_path(state_dir, cluster_id)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() >= deadline:
                    raise ClusterStateError(
                        f"another resize of this cluster is running (pid {holder}, lock {path}); try again when it ends"
                    ) from None
                if not told:
                    log.info("waiting for another resize of this cluster (pid %s) to end", holder)
                    told = True
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def live_nodes(store: Store, cluster_id: int) -> list[NodeRecord]:
    return [n for n in store.nodes.of(cluster_id) if n.state in LIVE_NODE_STATES]


class Resizer:
    """Adds and drains nodes of the running cluster of ``host``; callers hold ``resize_lock``."""

    def __init__(self, host: ResizeHost, poll_s: float = 0.2):
        self.host = host
        self.store = host.store
        self.poll_s = poll_s

    # adding -----------------------------------------------------------------------
    def add(self, count: int, why: str, replaces: str = "") -> list[NodeRecord]:
        """``count`` more nodes; returns once their engines registered, were recorded and warmed."""
        record = self.host.record
        provider = self.host.provider(record.provider)
        ipp_cluster = self._ipp_cluster(record)
        client = self.host.client
        known = set(client.ids) | {e.engine_id for e in self.store.engines.of(record.id)}
        self.store.events.add(record.id, "add", f"adding {count} slave(s): {why}")
        log.info("adding %d slave(s): %s", count, why)
        nodes = provider.add(record, ipp_cluster, count)  # if it raises, it released what it started
        try:
            for node in nodes:
                self.store.nodes.update(record.id, node.node_id, note=why)
            expected = provider.expected_engines(nodes)
            timeout = self.host.config.cluster.engine_timeout
            deadline = time.monotonic() + timeout
            while True:
                new = sorted(set(client.ids) - known)
                if len(new) >= expected:
                    break
                if time.monotonic() > deadline:
                    raise ProviderError(
                        f"only {len(new)} of {expected} engines of the new slave(s) "
                        f"{', '.join(n.node_id for n in nodes)} registered within {timeout} s; their logs are in "
                        f"{Path(record.profile_dir) / 'log'} (raise [cluster] engine_timeout if slaves are slow)"
                    )
                time.sleep(self.poll_s)
            joining.record_engines(
                self.store,
                self.host.config,
                record,
                client,
                record.threads_per_engine,
                nodes,
                engine_ids=new,
                ipp_cluster=ipp_cluster,
            )
            secure_files(Path(record.profile_dir))
        except BaseException as error:
            log.warning("the new slaves did not join (%s); releasing them", error)
            self._release(record, provider, ipp_cluster, nodes, f"failed to join: {error}")
            raise
        joining.warm_engines(client, self.host.run_spec(), timeout, targets=new)
        self.store.events.add(
            record.id,
            "add",
            f"{', '.join(n.node_id for n in nodes)} joined with engine(s) "
            f"{', '.join(map(str, new))}" + (f" (replacing {replaces})" if replaces else ""),
        )
        return nodes

    # draining and releasing ----------------------------------------------------------
    def remove(self, nodes: list[NodeRecord], why: str, drain: bool = True) -> None:
        """Drain ``nodes`` (unless ``drain`` is False: they are lost already), then release them."""
        if not nodes:
            return
        record = self.host.record
        provider = self.host.provider(record.provider)
        ipp_cluster = self._ipp_cluster(record, required=False)
        names = ", ".join(n.node_id for n in nodes)
        self.store.events.add(record.id, "remove", f"{'draining' if drain else 'releasing'} {names}: {why}")
        log.info("%s %s: %s", "draining" if drain else "releasing", names, why)
        if drain:
            self._drain(record, nodes)
        self._release(record, provider, ipp_cluster, nodes, why)
        self.store.events.add(record.id, "remove", f"released {names}")

    def _drain(self, record: ClusterRecord, nodes: list[NodeRecord]) -> None:
        ids = {n.node_id for n in nodes}
        engines = [e for e in self.store.engines.of(record.id) if e.node_id in ids]
        client = self.host.client
        live = [e.engine_id for e in engines if e.engine_id in client.ids]
        leaving = self.store.engines.leaving(record.id)
        try:  # from the first mark on, a timeout or Ctrl-C calls the drain off: the nodes serve again
            for engine in engines:
                if engine.engine_id not in leaving:  # a notice or loss already recorded keeps its reason
                    self.store.engines.mark_leaving(record.id, engine.engine_id, "drain")
            for node in nodes:
                self.store.nodes.update(record.id, node.node_id, state=NodeState.DRAINING)
            marked = time.monotonic()
            if live:
                # every one, idle too: the stop request is sticky, so a task the hub hands it before the
                # schedulers re-read the marks comes straight back with its checkpoint
                try:
                    client.send_signal("SIGUSR1", targets=live, block=True)
                except Exception as error:  # noqa: BLE001 - an engine that died meanwhile: nothing to drain
                    log.info("SIGUSR1 to engines %s: %s", live, error)
            timeout = self.host.config.cluster.drain_timeout
            deadline = marked + timeout
            while True:
                busy = self._busy(client, live)
                # every scheduler re-reads the marks within ROSTER_CHECK_S: after that, idle stays idle
                if not busy and time.monotonic() - marked >= 2 * ROSTER_CHECK_S:
                    return
                if time.monotonic() > deadline:
                    raise ClusterStateError(
                        f"engine(s) {', '.join(map(str, busy))} of {', '.join(sorted(ids))} still busy after "
                        f"[cluster] drain_timeout = {timeout} s; the drain is called off and they go on. Run the "
                        f"command again later, or raise drain_timeout"
                    )
                time.sleep(self.poll_s)
        except BaseException:
            self._call_off(record, nodes, client, live)
            raise

    def _call_off(self, record: ClusterRecord, nodes: list[NodeRecord], client, live: list[int]) -> None:
        from engines.process.stopping import clear

        ids = {n.node_id for n in nodes}
        leaving = self.store.engines.leaving(record.id)
        for engine in self.store.engines.of(record.id):
            if engine.node_id in ids and leaving.get(engine.engine_id) == "drain":
                self.store.engines.mark_leaving(record.id, engine.engine_id, "")
        for node in nodes:
            self.store.nodes.update(record.id, node.node_id, state=NodeState.RUNNING)
        if live:
            try:  # queued behind a running task, which stops at its boundary and goes on elsewhere
                client[live].apply_async(clear, "drain")
            except Exception as error:  # noqa: BLE001 - an engine gone meanwhile: nothing to call off there
                log.info("could not call the drain off on engines %s: %s", live, error)
        self.store.events.add(record.id, "remove", f"drain of {', '.join(sorted(ids))} called off")

    @staticmethod
    def _busy(client, engine_ids: list[int]) -> list[int]:
        registered, busy = set(client.ids), busy_engines(client)
        return [e for e in engine_ids if e in registered and e in busy]

    def _release(
        self, record: ClusterRecord, provider: Provider, ipp_cluster, nodes: list[NodeRecord], why: str
    ) -> None:
        ids = {n.node_id for n in nodes}
        for engine in self.store.engines.of(record.id):
            if engine.node_id in ids and not engine.leaving:
                self.store.engines.mark_leaving(record.id, engine.engine_id, "drain")
        try:
            provider.remove(record, ipp_cluster, nodes)
        finally:
            for node in nodes:
                self.store.nodes.update(record.id, node.node_id, note=why)
            if ipp_cluster is not None:
                secure_files(Path(record.profile_dir))

    @staticmethod
    def _ipp_cluster(record: ClusterRecord, required: bool = True):
        ipp_cluster = load_cluster(Path(record.profile_dir), record.ipp_cluster_id)
        if ipp_cluster is None and required:
            raise ClusterStateError(
                f"the ipyparallel cluster file of cluster {record.ipp_cluster_id} is gone; "
                f"run `cluster stop`, then `cluster start`"
            )
        return ipp_cluster


def choose_to_remove(nodes: list[NodeRecord], count: int, busy_nodes: set[str]) -> list[NodeRecord]:
    """``count`` nodes to turn off: idle ones first, the newest first within each (older ones have warm caches)."""
    ordered = sorted(nodes, key=lambda n: (n.node_id in busy_nodes, -(n.launched_at or 0), n.node_id))
    return ordered[:count]


def scale(host: ResizeHost, slaves: int, why: str = "") -> None:
    """Turn slaves on or off until ``slaves`` serve (``cluster scale``): the target first, then nodes added,
    or the idle ones drained and released; a resize that fails or is called off leaves the target as it was."""
    if not 0 <= slaves <= 256:
        raise UsageError(f"scale {slaves}: expected a number of slaves from 0 to 256")
    record = host.record
    if record.max_slaves and not (record.min_slaves or 0) <= slaves <= record.max_slaves:
        raise UsageError(
            f"scale {slaves}: this cluster autoscales between {record.min_slaves} and "
            f"{record.max_slaves} slaves (min_slaves/max_slaves); stay in that range"
        )
    store = host.store
    with resize_lock(host.config.state_dir, record.id):
        record = host.record
        nodes = live_nodes(store, record.id)
        before = record.target if record.target is not None else len(nodes)
        why = why or f"cluster scale {slaves}"
        with _new_target(store, record, before, slaves, why, f"({len(nodes)} serving)"):
            resizer = Resizer(host)
            if slaves > len(nodes):
                resizer.add(slaves - len(nodes), why)
            elif slaves < len(nodes):
                resizer.remove(choose_to_remove(nodes, len(nodes) - slaves, busy_nodes(host, record)), why)


def remove(host: ResizeHost, node_ids: list[str], why: str = "") -> None:
    """Drain these nodes, then release them (``cluster remove``); the target shrinks by as many (unless the
    drain is called off)."""
    if not node_ids:
        raise UsageError("remove: name at least one node (`cluster status` lists them)")
    record = host.record
    store = host.store
    with resize_lock(host.config.state_dir, record.id):
        record = host.record
        live = {n.node_id: n for n in live_nodes(store, record.id)}
        unknown = [n for n in node_ids if n not in live]
        if unknown:
            raise UsageError(f"remove {' '.join(unknown)}: no such running node; running: {', '.join(live) or 'none'}")
        chosen = [live[n] for n in dict.fromkeys(node_ids)]
        before = record.target if record.target is not None else len(live)
        target = max(0, before - len(chosen))
        why = why or f"cluster remove {' '.join(node_ids)}"
        with _new_target(store, record, before, target, why):
            Resizer(host).remove(chosen, why)


@contextlib.contextmanager
def _new_target(
    store: Store, record: ClusterRecord, before: int, target: int, why: str, serving: str = ""
) -> Iterator[None]:
    """The cluster's target is ``target`` while the resize runs; one that fails or is called off (Ctrl-C too:
    nothing was added, or the drained nodes serve on) puts it back to ``before``, which the keeper acts on."""
    store.clusters.update(record.id, target=target)
    store.events.add(record.id, "scale", f"target {before} -> {target}{' ' + serving if serving else ''}: {why}")
    try:
        yield
    except BaseException as error:
        store.clusters.update(record.id, target=before)
        store.events.add(record.id, "error", f"target back to {before}: {why} failed: {error!r}")
        raise


def busy_nodes(host: ResizeHost, record: ClusterRecord) -> set[str]:
    """Nodes with an engine that runs or holds a task now."""
    busy = busy_engines(host.client)
    return {e.node_id for e in host.store.engines.of(record.id) if e.engine_id in busy}

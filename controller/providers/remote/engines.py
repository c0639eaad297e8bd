"""Engines on nodes reached over SSH, shared by the ``ssh`` and ``aws`` providers: bootstrap them in
parallel (cancellable at once), hold their reverse tunnels, stop them by recorded pid or by pid file.

Also where the controller's engine ports listen, seen from the master: the address on the interface
that reaches the slaves (``engine_address``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from controller.errors import ProviderError
from controller.ipp.profile import engine_args, profile_dir
from controller.providers.base import SshTarget
from controller.providers.remote import tunnels
from controller.providers.remote.bootstrap import Bootstrapped, EngineSpec, start_on_slave
from controller.providers.remote.connection import connection_for, engine_connection, engine_ports
from controller.providers.remote.data_sync import sync_data
from controller.providers.remote.ownership import owner_of, stop_engines
from controller.providers.remote.transport import Cancel, SshConnection
from controller.store import ClusterRecord, NodeRecord, NodeState, Store

log = logging.getLogger(__name__)

# how long an adopting master tries to reach each node of the old controller: a node that does not answer
# SSH by then is lost (it died or was taken back while the master was away)
ADOPT_CONNECT_S = 15.0


def result(future: concurrent.futures.Future):
    """A worker's result, waited for in short slices.

    The kernel hands a Ctrl-C to whichever thread it likes; Python raises KeyboardInterrupt only
    when the main thread next runs, and a main thread blocked in an unbounded wait on a future
    would not run until that worker finished (minutes, for a host that never answers).
    """
    while True:
        try:
            return future.result(timeout=0.2)
        except concurrent.futures.TimeoutError:
            if future.done():  # the worker's own timeout (socket.timeout is a TimeoutError too)
                raise


def refuse_one_machine_twice(targets: list["Target"], remotes: list[SshConnection]) -> None:
    """Two names of one machine (an address and a DNS name, two ports of one sshd) would share its run dir,
    and the second bootstrap would stop the engines the first started. One boot id and one hostname make one
    machine: network namespaces and containers on one kernel share the boot id, not the hostname."""
    if len(targets) < 2:
        return
    seen: dict[tuple[str, str], Target] = {}
    for target, remote in zip(targets, remotes):
        _, out, _ = remote.run("cat /proc/sys/kernel/random/boot_id; hostname", check=False)
        lines = out.split()
        if len(lines) != 2:  # no boot id there (not Linux): nothing to compare by
            continue
        boot_id, hostname = lines
        if (boot_id, hostname) in seen:
            raise ProviderError(
                f"{seen[boot_id, hostname].host} and {target.host} are one machine ({hostname}, boot id {boot_id}): "
                f"list it once in [ssh] hosts (engines_per_host sets how many engines it runs)"
            )
        seen[boot_id, hostname] = target


@dataclass
class Target:
    """One node to bootstrap and how to reach it."""

    node: NodeRecord
    host: SshTarget


class RemoteEngines:
    """Engines on SSH-reachable nodes of one cluster: bootstrap, tunnels, stop.

    ``tag`` (the cluster name) names the run directory on every slave, so engines
    are found again by pid file even when the local store is gone.
    """

    def __init__(
        self,
        store: Store,
        state_dir: Path,
        tag: str,
        known_hosts: Path,
        *,
        python: str,
        remote_dir: str,
        data_dir: str = "",
        master_data_dir: Optional[Path] = None,
        engines_per_gpu: int = 1,
        engines_per_host: int = 0,
        threads: int = 0,
        master_grace_minutes: float = 10.0,
        on_step: Callable[[str], None] = lambda step: None,
    ):
        self.store = store
        self.tag = tag
        self.known_hosts = Path(known_hosts)
        self.state_dir = Path(state_dir)
        self.tunnel_dir = Path(state_dir) / "tunnels" / tag
        self.python = python
        self.remote_dir = remote_dir
        self.data_dir = data_dir  # on the slaves; filled from master_data_dir when the master has the files
        self.master_data_dir = master_data_dir
        self.engines_per_gpu = engines_per_gpu
        self.engines_per_host = engines_per_host
        self.threads = threads
        self.master_grace_minutes = master_grace_minutes
        self.on_step = on_step

    # start ------------------------------------------------------------------------
    def start(
        self, cluster: ClusterRecord, targets: list[Target], tunnel: bool, timeout: float = 300, batch: str = ""
    ) -> list[NodeRecord]:
        """Bootstrap every target in parallel; on any failure (Ctrl-C too) stop what was started, re-raise.

        ``batch``: slaves added to a running cluster (``cluster scale``) get tunnels of their own, held
        by a process of their own under ``tunnel_dir/batch``; the first batch's stay as they are."""
        if not targets:
            raise ProviderError("no slaves to bootstrap")
        connection = engine_connection(cluster, timeout)
        owner = self._owner(cluster.id)
        # set on any failure, Ctrl-C included: it breaks every connect attempt, command and upload in
        # flight, so the worker threads end in a moment instead of after their timeouts (minutes)
        cancelled = Cancel()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(targets)))

        def connect(target: Target) -> SshConnection:
            remote = SshConnection.connect(target.host, self.known_hosts, timeout=timeout, cancelled=cancelled)
            cancelled.on_cancel(remote.close)
            return remote

        try:
            remotes = [result(f) for f in [pool.submit(connect, t) for t in targets]]
            refuse_one_machine_twice(targets, remotes)
            self.on_step("ssh")
            try:
                slave_ports: dict[str, dict[int, int]] = {}
                if tunnel:
                    slave_ports = self._open_tunnels(
                        targets,
                        connection,
                        cluster.ipp_cluster_id,
                        self.tunnel_dir / batch if batch else self.tunnel_dir,
                    )
                    self.on_step("tunnels")
                for target in targets:  # recorded before engines start (the store is used from this thread only)
                    target.node.state = NodeState.BOOTSTRAPPING
                    self.store.nodes.put(cluster.id, target.node)
                futures = [
                    pool.submit(
                        self._bootstrap_one,
                        t,
                        r,
                        self._spec(r, connection, tunnel, owner, slave_ports.get(t.node.node_id)),
                        cancelled,
                    )
                    for t, r in zip(targets, remotes)
                ]
                nodes = []
                for target, future in zip(targets, futures):  # the first failure raises here
                    nodes.append(self._record(cluster, target.node, result(future)))
                    self.on_step("bootstrap")
            finally:
                for r in remotes:
                    r.close()
            return nodes
        except BaseException:
            cancelled.set()
            # the workers' sockets are closed: they end at once, and engines a bootstrap started
            # just before are in its pid files, which the stop below reads
            pool.shutdown(wait=True, cancel_futures=True)
            if batch:  # the cluster's other slaves go on
                self.stop_hosts(cluster.id, {t.node.node_id: t.host for t in targets}, quiet=True)
            else:
                self.stop(cluster.id, [t.host for t in targets], quiet=True)
            raise
        finally:
            pool.shutdown(wait=True)

    def _owner(self, cluster_id: Optional[int]) -> str:
        """This cluster as its slaves' run dirs record it (the controller read here: the store is this thread's)."""
        record = self.store.clusters.get(cluster_id) if cluster_id is not None else None
        return owner_of(record.controller_pid if record is not None else None, self.state_dir)

    def _spec(
        self,
        remote: SshConnection,
        connection: dict,
        tunnel: bool,
        owner: str,
        slave_ports: Optional[dict[int, int]] = None,
    ) -> EngineSpec:
        """What starts the engines on one slave; through tunnels, on that slave's ends of them."""
        address = "127.0.0.1" if tunnel else remote.local_address
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)} if self.threads else {}
        return EngineSpec(
            tag=self.tag,
            connection=connection_for(connection, address, slave_ports),
            python=self.python,
            remote_dir=self.remote_dir,
            engines_per_gpu=self.engines_per_gpu,
            engines=self.engines_per_host,
            env=env,
            args=tuple(engine_args(self.master_grace_minutes)),
            owner=owner,
        )

    def _bootstrap_one(
        self, target: Target, remote: SshConnection, spec: EngineSpec, cancelled: threading.Event
    ) -> Bootstrapped:
        """In a worker thread: remote work only (the store belongs to the calling thread)."""
        if self.data_dir and self.master_data_dir is not None:
            sync_data(remote, self.master_data_dir, self.data_dir)
        return start_on_slave(remote, spec, cancelled)

    # adopt --------------------------------------------------------------------------
    def adopt(
        self,
        cluster: ClusterRecord,
        targets: list[Target],
        tunnel: bool,
        timeout: float = 300,
        connect_timeout: float = ADOPT_CONNECT_S,
    ) -> tuple[list[NodeRecord], dict[str, str]]:
        """A new controller takes over these nodes, still up after the master restarted: on each one the old
        engines are stopped (recorded pids and pid files, as ``stop``) and new ones started against the new
        controller (connection file uploaded again; by the bootstrap stamp, without upload or import check
        when the code there is this master's). The old tunnel holders end; the adopted nodes get new ones.

        Returns the adopted nodes and, by node id, why each other one is lost (no SSH answer within
        ``connect_timeout``, or its engines would not restart); lost nodes are recorded ``lost``. On Ctrl-C
        (any BaseException) the workers are cancelled at once and it re-raises with the nodes still recorded:
        the caller releases them as after a failed start."""
        connection = engine_connection(cluster, timeout)
        owner = self._owner(cluster.id)
        known = self.store.remote_engines.pids(cluster.id)
        cancelled = Cancel()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, max(1, len(targets))))

        def connect(target: Target) -> SshConnection:
            # record_new=False: an adopted node must show the host key its bootstrap recorded
            remote = SshConnection.connect(
                target.host, self.known_hosts, timeout=connect_timeout, record_new=False, cancelled=cancelled
            )
            cancelled.on_cancel(remote.close)
            return remote

        def restart(target: Target, remote: SshConnection) -> Bootstrapped:
            left = stop_engines(remote, self.remote_dir, self.tag, known.get(target.node.node_id, ()), owner)
            if left:
                raise ProviderError(f"its old engine(s) {', '.join(map(str, left))} still run after SIGKILL")
            spec = self._spec(remote, connection, tunnel, owner, slave_ports.get(target.node.node_id))
            return start_on_slave(remote, spec, cancelled)

        lost: dict[str, str] = {}
        remotes: dict[str, SshConnection] = {}
        adopted: list[NodeRecord] = []
        try:
            for target, future in [(t, pool.submit(connect, t)) for t in targets]:
                try:
                    remotes[target.node.node_id] = result(future)
                except Exception as error:  # noqa: BLE001 - a node gone while the master was away
                    lost[target.node.node_id] = f"no SSH answer: {error}"
            reached = [t for t in targets if t.node.node_id in remotes]
            self.stop_tunnels()  # the old controller's (dead after a machine restart, alive after a process one)
            slave_ports: dict[str, dict[int, int]] = {}
            if tunnel and reached:
                slave_ports = self._open_tunnels(reached, connection, cluster.ipp_cluster_id, self.tunnel_dir)
            restarts = [(t, pool.submit(restart, t, remotes[t.node.node_id])) for t in reached]
            for target, restarting in restarts:
                try:
                    started = result(restarting)
                except Exception as error:  # noqa: BLE001 - one broken node must not cost the others
                    lost[target.node.node_id] = str(error)
                    continue
                self.store.remote_engines.forget(cluster.id, target.node.node_id)
                adopted.append(self._record(cluster, target.node, started))
                self.on_step("adopt")  # not one of the providers' STEPS: those are start's
        except BaseException:
            cancelled.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            for remote in remotes.values():
                remote.close()
            pool.shutdown(wait=True)
        now = time.time()
        for node_id, why in lost.items():
            log.warning("node %s of cluster %s is lost: %s", node_id, cluster.id, why)
            self.store.nodes.update(cluster.id, node_id, state=NodeState.LOST, terminated_at=now)
        return adopted, lost

    def _record(self, cluster: ClusterRecord, node: NodeRecord, result: Bootstrapped) -> NodeRecord:
        self.store.remote_engines.add(cluster.id, node.node_id, result.pids, result.remote_dir)
        node.host, node.engines, node.state = result.hostname, len(result.pids), NodeState.RUNNING
        self.store.nodes.put(cluster.id, node)
        return node

    def _open_tunnels(
        self, targets: list[Target], connection: dict, cluster_id: str, folder: Path
    ) -> dict[str, dict[int, int]]:
        """A holder process for the reverse tunnels of ``targets``; by node id, each one's port for each of the
        controller's engine ports."""
        spec = tunnels.TunnelSpec(
            hosts=[asdict(t.host) for t in targets], known_hosts=str(self.known_hosts), ports=engine_ports(connection)
        )
        pid, slave_ports = tunnels.spawn(spec, folder, profile=profile_dir(self.state_dir), cluster_id=cluster_id)
        (folder / "tunnels.pid").write_text(str(pid))
        log.info("SSH reverse tunnels up (pid %s) for %d slave(s)", pid, len(targets))
        return {t.node.node_id: ports for t, ports in zip(targets, slave_ports)}

    # stop -------------------------------------------------------------------------
    def stop(self, cluster_id: Optional[int], hosts: list[SshTarget], quiet: bool = False) -> list[str]:
        """Stop the engines of this cluster on every host, then the tunnels. Returns the problems met."""
        problems = self._stop_engines(cluster_id, hosts, quiet)
        self.stop_tunnels()
        if cluster_id is not None:
            self.store.remote_engines.forget(cluster_id)
        return problems

    def stop_hosts(self, cluster_id: int, hosts: dict[str, SshTarget], quiet: bool = False) -> list[str]:
        """Stop the engines on these nodes (node id -> host) only, and the tunnels that served them alone."""
        problems = self._stop_engines(cluster_id, list(hosts.values()), quiet)
        for node_id in hosts:
            self.store.remote_engines.forget(cluster_id, node_id)
        gone = {(h.address, h.port) for h in hosts.values()}
        for pid_file in self.tunnel_dir.glob("*/tunnels.pid"):  # the holders of added batches
            try:
                spec = tunnels.TunnelSpec.load(pid_file.parent / "tunnels.json")
            except (OSError, ValueError, TypeError):
                continue
            if all((h["address"], h["port"]) in gone for h in spec.hosts):
                (pid_file.parent / "tunnels.ready").unlink(missing_ok=True)
                tunnels.kill(int(pid_file.read_text() or 0))
                pid_file.unlink(missing_ok=True)
        return problems

    def _stop_engines(self, cluster_id: Optional[int], hosts: list[SshTarget], quiet: bool) -> list[str]:
        problems = []
        known = self.store.remote_engines.pids(cluster_id) if cluster_id is not None else {}
        owner = self._owner(cluster_id)

        def stop_one(host: SshTarget) -> None:
            # a host never contacted has no recorded key: nothing of ours can run there
            if not self._key_recorded(host):
                return
            with SshConnection.connect(host, self.known_hosts, timeout=20, record_new=False) as remote:
                pids = tuple(p for node_id, ps in known.items() if node_id in (str(host), host.address) for p in ps)
                left = stop_engines(remote, self.remote_dir, self.tag, pids, owner)
            if left:
                raise ProviderError(f"engine process(es) {', '.join(map(str, left))} still running after SIGKILL")

        if hosts:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
                for host, future in [(h, pool.submit(stop_one, h)) for h in hosts]:
                    try:
                        future.result()
                    except Exception as error:  # noqa: BLE001 - one unreachable slave must not stop the clean-up of the others
                        problems.append(f"{host}: {error}")
                        (log.info if quiet else log.warning)("could not stop the engines on %s: %s", host, error)
        return problems

    def stop_tunnels(self) -> None:
        """Every tunnel holder of the cluster: the first batch's and those of slaves added later."""
        for folder in [self.tunnel_dir, *(p.parent for p in self.tunnel_dir.glob("*/tunnels.pid"))]:
            pid_file = folder / "tunnels.pid"
            (folder / "tunnels.ready").unlink(missing_ok=True)  # the holder exits on its own too
            if pid_file.exists():
                tunnels.kill(int(pid_file.read_text() or 0))
                pid_file.unlink(missing_ok=True)

    def _key_recorded(self, host: SshTarget) -> bool:
        import paramiko

        if not self.known_hosts.exists():
            return False
        keys = paramiko.HostKeys(str(self.known_hosts))
        name = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
        return keys.lookup(name) is not None

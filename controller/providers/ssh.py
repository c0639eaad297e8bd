"""Slaves the user already owns (a lab's GPU boxes, gaming PCs), reached over SSH; no cloud API.

``[ssh] hosts = gpu1, gpu2:2222`` with ``user`` and ``key_file``.  Every host
is bootstrapped over SSH (``controller.remote``): engine code uploaded, the
environment verified, the connection file uploaded 0600, engines started in
the background.  ``RemoteEngines`` is the part the aws provider shares.
"""
from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import logging
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .. import ipcluster
from .. import remote as rm
from .. import tunnels
from ..errors import ConfigError, ProviderError
from ..store import ClusterRecord, NodeRecord, Store
from .base import Provider, SshTarget

log = logging.getLogger(__name__)



def local_addresses() -> list[ipaddress.IPv4Interface]:
    """The master's IPv4 interface addresses (empty when ``ip`` is not there: then nothing is 'local')."""
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            found.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]))
    return found


def source_address(host: str, port: int = 22) -> str:
    """The master's address on the interface its routes use to reach ``host`` ('' if none; sends nothing)."""
    try:
        family, kind, proto, _, target = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(target)
            return probe.getsockname()[0]
    except OSError:
        return ""


def engine_address(sources: list[str]) -> str:
    """Where the controller's engine ports listen: the one address every slave is reached from.

    Slaves behind different interfaces leave only every interface (0.0.0.0, client
    ports included: they share the registration port); the controller then requires
    CurveZMQ (controller.ipcluster), as it does for any address beyond loopback.
    """
    found = set(sources)
    if len(found) == 1 and "" not in found:
        return found.pop()
    log.warning("the slaves are reached from %s: the controller listens on every interface, CurveZMQ-encrypted "
                "(tunnel = always, or slaves behind one interface, keep it to one address)",
                ", ".join(sorted(a or "no route" for a in found)))
    return "0.0.0.0"


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


@dataclass
class Target:
    """One node to bootstrap and how to reach it."""

    node: NodeRecord
    host: rm.Host


class RemoteEngines:
    """Engines on SSH-reachable nodes of one cluster: bootstrap, tunnels, stop.

    ``tag`` (the cluster name) names the run directory on every slave, so engines
    are found again by pid file even when the local store is gone.
    """

    def __init__(self, store: Store, state_dir: Path, tag: str, known_hosts: Path, *, python: str,
                 remote_dir: str, data_dir: str = "", master_data_dir: Optional[Path] = None,
                 engines_per_gpu: int = 1, engines_per_host: int = 0, threads: int = 0,
                 master_grace_minutes: float = 10.0, on_step: Callable[[str], None] = lambda step: None):
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
    def start(self, cluster: ClusterRecord, targets: list[Target], tunnel: bool, timeout: float = 300,
              batch: str = "") -> list[NodeRecord]:
        """Bootstrap every target in parallel; on any failure (Ctrl-C too) stop what was started, re-raise.

        ``batch``: slaves added to a running cluster (``cluster scale``) get tunnels of their own, held
        by a process of their own under ``tunnel_dir/batch``; the first batch's stay as they are."""
        if not targets:
            raise ProviderError("no slaves to bootstrap")
        connection = self._connection(cluster, timeout)
        # set on any failure, Ctrl-C included: it breaks every connect attempt, command and upload in
        # flight, so the worker threads end in a moment instead of after their timeouts (minutes)
        cancelled = rm.Cancel()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(targets)))

        def connect(target: Target) -> rm.Remote:
            remote = rm.Remote.connect(target.host, self.known_hosts, timeout=timeout, cancelled=cancelled)
            cancelled.on_cancel(remote.close)
            return remote

        try:
            remotes = [result(f) for f in [pool.submit(connect, t) for t in targets]]
            self.on_step("ssh")
            try:
                if tunnel:
                    self._open_tunnels(targets, connection, cluster.ipp_cluster_id,
                                       self.tunnel_dir / batch if batch else self.tunnel_dir)
                    self.on_step("tunnels")
                for target in targets:  # recorded before engines start (the store is used from this thread only)
                    target.node.state = "bootstrapping"
                    self.store.nodes.put(cluster.id, target.node)
                futures = [pool.submit(self._bootstrap_one, t, r, connection, tunnel, cancelled)
                           for t, r in zip(targets, remotes)]
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

    @staticmethod
    def _connection(cluster: ClusterRecord, timeout: float) -> dict:
        """The controller's engine connection file, once it has written it (it does so after starting)."""
        path = ipcluster.engine_file(Path(cluster.profile_dir), cluster.ipp_cluster_id)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                if time.monotonic() > deadline:
                    raise ProviderError(f"the controller wrote no engine connection file {path} within {timeout:.0f} s") from None
                time.sleep(0.1)

    def _bootstrap_one(self, target: Target, remote: rm.Remote, connection: dict, tunnel: bool,
                       cancelled: threading.Event) -> rm.Bootstrapped:
        """In a worker thread: remote work only (the store belongs to the calling thread)."""
        address = "127.0.0.1" if tunnel else remote.local_address
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)} if self.threads else {}
        spec = rm.EngineSpec(tag=self.tag, connection=rm.connection_for(connection, address), python=self.python,
                             remote_dir=self.remote_dir, engines_per_gpu=self.engines_per_gpu,
                             engines=self.engines_per_host, env=env,
                             args=tuple(ipcluster.engine_args(self.master_grace_minutes)))
        if self.data_dir and self.master_data_dir is not None:
            rm.sync_data(remote, self.master_data_dir, self.data_dir)
        return rm.bootstrap(remote, spec, cancelled)

    def _record(self, cluster: ClusterRecord, node: NodeRecord, result: rm.Bootstrapped) -> NodeRecord:
        for pid in result.pids:
            self.store.execute("INSERT OR REPLACE INTO remote_engines VALUES (?, ?, ?, ?)",
                               (cluster.id, node.node_id, pid, result.remote_dir))
        node.host, node.engines, node.state = result.hostname, len(result.pids), "running"
        self.store.nodes.put(cluster.id, node)
        return node

    def _open_tunnels(self, targets: list[Target], connection: dict, cluster_id: str, folder: Path) -> None:
        from dataclasses import asdict

        spec = tunnels.TunnelSpec(hosts=[asdict(t.host) for t in targets], known_hosts=str(self.known_hosts),
                                  ports=rm.engine_ports(connection))
        pid = tunnels.spawn(spec, folder, profile=ipcluster.profile_dir(self.state_dir), cluster_id=cluster_id)
        (folder / "tunnels.pid").write_text(str(pid))
        log.info("SSH reverse tunnels up (pid %s) for %d slave(s)", pid, len(targets))

    # stop -------------------------------------------------------------------------
    def stop(self, cluster_id: Optional[int], hosts: list[rm.Host], quiet: bool = False) -> list[str]:
        """Stop the engines of this cluster on every host, then the tunnels. Returns the problems met."""
        problems = self._stop_engines(cluster_id, hosts, quiet)
        self.stop_tunnels()
        if cluster_id is not None:
            self.store.execute("DELETE FROM remote_engines WHERE cluster_id = ?", (cluster_id,))
        return problems

    def stop_hosts(self, cluster_id: int, hosts: dict[str, rm.Host], quiet: bool = False) -> list[str]:
        """Stop the engines on these nodes (node id -> host) only, and the tunnels that served them alone."""
        problems = self._stop_engines(cluster_id, list(hosts.values()), quiet)
        for node_id in hosts:
            self.store.execute("DELETE FROM remote_engines WHERE cluster_id = ? AND node_id = ?", (cluster_id, node_id))
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

    def _stop_engines(self, cluster_id: Optional[int], hosts: list[rm.Host], quiet: bool) -> list[str]:
        problems = []
        known: dict[str, list[int]] = {}
        if cluster_id is not None:
            for row in self.store.execute("SELECT node_id, pid FROM remote_engines WHERE cluster_id = ?", (cluster_id,)):
                known.setdefault(row[0], []).append(row[1])

        def stop_one(host: rm.Host) -> None:
            # a host never contacted has no recorded key: nothing of ours can run there
            if not self._key_recorded(host):
                return
            with rm.Remote.connect(host, self.known_hosts, timeout=20, record_new=False) as remote:
                pids = tuple(p for node_id, ps in known.items() if node_id in (str(host), host.address) for p in ps)
                left = rm.stop_engines(remote, self.remote_dir, self.tag, pids)
            if left:
                raise ProviderError(f"engine process(es) {', '.join(map(str, left))} still running after SIGKILL")

        if hosts:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
                for host, future in [(h, pool.submit(stop_one, h)) for h in hosts]:
                    try:
                        future.result()
                    except Exception as error:  # one unreachable slave must not stop the clean-up of the others
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

    def _key_recorded(self, host: rm.Host) -> bool:
        import paramiko

        if not self.known_hosts.exists():
            return False
        keys = paramiko.HostKeys(str(self.known_hosts))
        name = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
        return keys.lookup(name) is not None


class SshProvider(Provider):
    name = "ssh"

    _engine_ip: Optional[str] = None  # decided by preflight, before the controller starts

    @property
    def controller_ip(self) -> str:  # type: ignore[override]
        # tunnels: engines come through SSH to loopback; else the interface that reaches the slaves
        if self.config.ssh.tunnel == "always":
            return "127.0.0.1"
        if self._engine_ip is None:
            self._engine_ip = engine_address([source_address(h.address, h.port) for h in self.hosts()])
        return self._engine_ip

    # test hook: called after each step of start ("ssh", "tunnels", "bootstrap"); a no-op otherwise
    on_step: Callable[[str], None] = staticmethod(lambda step: None)

    def hosts(self) -> list[rm.Host]:
        cfg = self.config.ssh
        if not cfg.hosts:
            raise ConfigError(f"{self.config.source}: [ssh] hosts is empty; list the slaves, e.g. hosts = gpu1, gpu2:2222")
        hosts = []
        for text in cfg.hosts:
            try:
                hosts.append(rm.Host.parse(text, cfg.user, str(Path(cfg.key_file).expanduser()) if cfg.key_file else ""))
            except ValueError:
                raise ConfigError(f"{self.config.source}: [ssh] hosts: {text!r} is not host or host:port") from None
        return hosts

    def known_hosts(self) -> Path:
        cfg = self.config.ssh
        return Path(cfg.known_hosts).expanduser() if cfg.known_hosts else self.config.state_dir / "known_hosts"

    def engines(self) -> RemoteEngines:
        cfg = self.config.ssh
        # the master's host in the tag: two masters' clusters of one name on a shared box stay apart
        tag = f"{self.config.cluster.name}.{socket.gethostname()}"
        return RemoteEngines(self.store, self.config.state_dir, tag, self.known_hosts(),
                             python=cfg.python, remote_dir=cfg.remote_dir, data_dir=cfg.data_dir,
                             master_data_dir=self.config.data_dir, engines_per_host=cfg.engines_per_host,
                             threads=self.config.cluster.threads_per_engine,
                             master_grace_minutes=self.config.cluster.master_grace_minutes, on_step=type(self).on_step)

    def engine_data_dir(self) -> str:
        return self.config.ssh.data_dir

    def preflight(self, slaves: int) -> None:
        hosts = self.hosts()
        if slaves > len(hosts):
            raise ConfigError(f"--slaves {slaves}: [ssh] hosts lists only {len(hosts)} machine(s)")
        if hosts[0].key_file:
            rm._load_key(hosts[0].key_file)  # a missing or unreadable key: say so now
        if self.config.ssh.tunnel != "always":
            # every configured host, not only the first ``slaves``: `cluster scale` may add any of them later
            self._engine_ip = engine_address([source_address(h.address, h.port) for h in hosts])

    def start(self, cluster: ClusterRecord, ipp_cluster, slaves: int) -> list[NodeRecord]:
        self.preflight(slaves)
        return self._bring_up(cluster, self.hosts()[:slaves], batch="")

    def add(self, cluster: ClusterRecord, ipp_cluster, count: int) -> list[NodeRecord]:
        """The next ``count`` hosts of ``[ssh] hosts`` that no running node of the cluster uses."""
        in_use = {n.node_id for n in self.store.nodes.of(cluster.id) if n.state not in ("stopped", "lost")}
        free = [h for h in self.hosts() if str(h) not in in_use]
        if len(free) < count:
            raise ProviderError(
                f"no unused host left in [ssh] hosts for {count} more slave(s): {len(free)} free of "
                f"{len(self.hosts())} ({', '.join(sorted(in_use)) or 'none'} in use); add hosts to "
                f"[ssh] hosts in {self.config.source}")
        batch = f"add-{int(time.time() * 1000)}"
        return self._bring_up(cluster, free[:count], batch=batch)

    def _bring_up(self, cluster: ClusterRecord, hosts: list[rm.Host], batch: str) -> list[NodeRecord]:
        """Bootstrap engines on ``hosts`` (the one path of ``start`` and ``add``)."""
        price = self.config.cluster.price_per_hour / max(len(self.hosts()) if batch else len(hosts), 1)
        now = time.time()
        targets = [Target(NodeRecord(node_id=str(h), provider=self.name, host=h.address, state="starting",
                                     market="owned", price_per_hour=price, public_ip=h.address, launched_at=now), h)
                   for h in hosts]
        return self.engines().start(cluster, targets, tunnel=self.config.ssh.tunnel == "always",
                                    timeout=self.config.cluster.engine_timeout, batch=batch)

    def remove(self, cluster: ClusterRecord, ipp_cluster, nodes: list[NodeRecord]) -> None:
        hosts = {n.node_id: rm.Host.parse(n.node_id, self.config.ssh.user, self.config.ssh.key_file) for n in nodes}
        problems = self.engines().stop_hosts(cluster.id, hosts)
        failed = {problem.split(": ", 1)[0] for problem in problems}
        now = time.time()
        for node in nodes:
            if node.node_id not in failed:
                self.store.nodes.update(cluster.id, node.node_id, state="stopped", terminated_at=now)
        if problems:
            raise ProviderError("could not stop the engines on " + "; ".join(problems)
                                + ". Stop them there (`cluster ssh NODE`) or run `cluster remove` again")

    def stop(self, cluster: ClusterRecord, ipp_cluster) -> None:
        stored = {n.node_id for n in self.store.nodes.of(cluster.id)}
        # the configured hosts too: engines of this cluster may run where the store does not know
        hosts = {str(h): h for h in self.hosts()} if self.config.ssh.hosts else {}
        for node_id in stored - set(hosts):
            hosts[node_id] = rm.Host.parse(node_id, self.config.ssh.user, self.config.ssh.key_file)
        problems = self.engines().stop(cluster.id, list(hosts.values()))
        failed = {problem.split(": ", 1)[0] for problem in problems}
        for node in self.store.nodes.of(cluster.id):
            if node.state != "stopped" and node.node_id not in failed:
                node.state, node.terminated_at = "stopped", time.time()
                self.store.nodes.put(cluster.id, node)
        if problems:  # engines may still run there: say so, and let `cluster stop` be run again
            raise ProviderError(
                "could not stop the engines on " + "; ".join(problems)
                + ". Run `cluster stop` again once the hosts answer, or stop them there (`cluster ssh NODE`).")

    def release_orphans(self, name: str, everything: bool = False, any_owner: bool = False,
                        only: Optional[set[str]] = None) -> list[str]:
        """With the local state lost: stop this cluster's engines on every configured host."""
        if not self.config.ssh.hosts:
            return []
        problems = self.engines().stop(None, self.hosts())
        failed = {problem.split(": ", 1)[0] for problem in problems}
        for problem in problems:
            log.warning("could not stop engines on %s", problem)
        return [str(h) for h in self.hosts() if str(h) not in failed]

    def list(self, cluster: ClusterRecord) -> list[NodeRecord]:
        return self.store.nodes.of(cluster.id)

    def ssh_target(self, node: NodeRecord) -> SshTarget:
        host = rm.Host.parse(node.node_id, self.config.ssh.user, self.config.ssh.key_file)
        return SshTarget(host=host.address, port=host.port, user=host.user,
                         key_file=str(Path(host.key_file).expanduser()) if host.key_file else "",
                         known_hosts=str(self.known_hosts()))

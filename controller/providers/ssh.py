"""Slaves the user already owns (a lab's GPU boxes, gaming PCs), reached over SSH; no cloud API.

``[ssh] hosts = gpu1, gpu2:2222`` with ``user`` and ``key_file``.  Every host
is bootstrapped over SSH (``controller.providers.remote.engines``): engine code uploaded, the
environment verified, the connection file uploaded 0600, engines started in
the background.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from pathlib import Path
from typing import Optional

from controller.errors import ConfigError, ProviderError
from controller.providers.base import Provider, SshTarget
from controller.providers.remote.connection import engine_address, source_address
from controller.providers.remote.engines import RemoteEngines, Target
from controller.providers.remote.transport import load_key
from controller.store import ClusterRecord, NodeRecord, NodeState

log = logging.getLogger(__name__)


# a host an adoption found unreachable is not tried again for this long (see ``SshProvider.add``)
UNANSWERED_RETRY_S = 120.0


class SshProvider(Provider):
    name = "ssh"
    STEPS = ("ssh", "tunnels", "bootstrap")  # tunnels: only with [ssh] tunnel = always

    def hosts(self) -> list[SshTarget]:
        cfg = self.config.ssh
        if not cfg.hosts:
            raise ConfigError(
                f"{self.config.source}: [ssh] hosts is empty; list the slaves, e.g. hosts = gpu1, gpu2:2222"
            )
        hosts = []
        for text in cfg.hosts:
            try:
                hosts.append(
                    SshTarget.parse(text, cfg.user, str(Path(cfg.key_file).expanduser()) if cfg.key_file else "")
                )
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
        return RemoteEngines(
            self.store,
            self.config.state_dir,
            tag,
            self.known_hosts(),
            python=cfg.python,
            remote_dir=cfg.remote_dir,
            data_dir=cfg.data_dir,
            master_data_dir=self.config.data_dir,
            engines_per_host=cfg.engines_per_host,
            threads=self.config.cluster.threads_per_engine,
            master_grace_minutes=self.config.cluster.master_grace_minutes,
            on_step=self.hooks.on_step,
        )

    def engine_data_dir(self) -> str:
        return self.config.ssh.data_dir

    def preflight(self, slaves: int, adopting: bool = False) -> str:
        hosts = self.hosts()
        seen: dict[tuple[str, int], str] = {}
        for text, host in zip(self.config.ssh.hosts, hosts):
            # two nodes on one slave would share its run dir: the second's start would stop the first's engines
            # (only a start refuses: `stop` must still reach every host a cluster may have used)
            if (host.address, host.port) in seen:
                raise ConfigError(
                    f"{self.config.source}: [ssh] hosts names one slave twice "
                    f"({seen[host.address, host.port]!r} and {text!r}); list each slave once "
                    f"(engines_per_host sets engines per slave)"
                )
            seen[host.address, host.port] = text
        if slaves > len(hosts):
            raise ConfigError(f"--slaves {slaves}: [ssh] hosts lists only {len(hosts)} machine(s)")
        if hosts[0].key_file:
            load_key(hosts[0].key_file)  # a missing or unreadable key: say so now
        # tunnels: engines come through SSH to loopback; else the interface that reaches the slaves
        if self.config.ssh.tunnel == "always":
            return "127.0.0.1"
        # every configured host, not only the first ``slaves``: `cluster scale` may add any of them later
        return engine_address([source_address(h.address, h.port) for h in hosts])

    def start(self, cluster: ClusterRecord, ipp_cluster, slaves: int) -> list[NodeRecord]:
        self.preflight(slaves)  # the checks only: the controller already listens where preflight said
        return self._bring_up(cluster, self.hosts()[:slaves], batch="")

    def add(self, cluster: ClusterRecord, ipp_cluster, count: int) -> list[NodeRecord]:
        """The next ``count`` hosts of ``[ssh] hosts`` that no running node of the cluster uses (hosts lost
        last: their engines died the last time). A host an adoption found unreachable less than
        ``UNANSWERED_RETRY_S`` ago is not tried: a dead machine would hold the add for a whole connect
        timeout (the adoption that just found it dead would wait for it twice)."""
        nodes = self.store.nodes.of(cluster.id)
        now = time.time()
        in_use = {n.node_id for n in nodes if n.state not in (NodeState.STOPPED, NodeState.LOST)}
        lost = {n.node_id for n in nodes if n.state == NodeState.LOST}
        # lost with a time: recorded by an adoption that could not reach the host or restart its engines (the
        # keeper's lost nodes, whose engines died on a host that may well answer, have none)
        unanswered = {
            n.node_id: now - n.terminated_at
            for n in nodes
            if n.state == NodeState.LOST and n.terminated_at and now - n.terminated_at < UNANSWERED_RETRY_S
        }
        free = sorted(
            (h for h in self.hosts() if str(h) not in in_use and str(h) not in unanswered), key=lambda h: str(h) in lost
        )
        if len(free) < count:
            waiting = "".join(
                f"; {host} was lost {age:.0f} s ago, unreachable (tried again {UNANSWERED_RETRY_S:.0f} s after)"
                for host, age in sorted(unanswered.items())
            )
            raise ProviderError(
                f"no unused host left in [ssh] hosts for {count} more slave(s): {len(free)} free of "
                f"{len(self.hosts())} ({', '.join(sorted(in_use)) or 'none'} in use{waiting}); add hosts to "
                f"[ssh] hosts in {self.config.source}"
            )
        batch = f"add-{int(time.time() * 1000)}"
        return self._bring_up(cluster, free[:count], batch=batch)

    def _bring_up(self, cluster: ClusterRecord, hosts: list[SshTarget], batch: str) -> list[NodeRecord]:
        """Bootstrap engines on ``hosts`` (the one path of ``start`` and ``add``)."""
        price = self.config.cluster.price_per_hour / max(len(self.hosts()) if batch else len(hosts), 1)
        now = time.time()
        targets = [
            Target(
                NodeRecord(
                    node_id=str(h),
                    provider=self.name,
                    host=h.address,
                    state=NodeState.STARTING,
                    market="owned",
                    price_per_hour=price,
                    public_ip=h.address,
                    launched_at=now,
                ),
                h,
            )
            for h in hosts
        ]
        return self.engines().start(
            cluster,
            targets,
            tunnel=self.config.ssh.tunnel == "always",
            timeout=self.config.cluster.engine_timeout,
            batch=batch,
        )

    def adopt(self, cluster: ClusterRecord, ipp_cluster, nodes: list[NodeRecord]) -> list[NodeRecord]:
        """The hosts of ``nodes`` that answer SSH: old engines stopped, new ones started (``RemoteEngines.adopt``)."""
        cfg = self.config.ssh
        targets = [Target(node, SshTarget.parse(node.node_id, cfg.user, cfg.key_file)) for node in nodes]
        adopted, _ = self.engines().adopt(
            cluster, targets, tunnel=cfg.tunnel == "always", timeout=self.config.cluster.engine_timeout
        )
        return adopted

    def remove(self, cluster: ClusterRecord, ipp_cluster, nodes: list[NodeRecord]) -> None:
        hosts = {n.node_id: SshTarget.parse(n.node_id, self.config.ssh.user, self.config.ssh.key_file) for n in nodes}
        problems = self.engines().stop_hosts(cluster.id, hosts)
        failed = {problem.split(": ", 1)[0] for problem in problems}
        now = time.time()
        for node in nodes:
            if node.node_id not in failed:
                self.store.nodes.update(cluster.id, node.node_id, state=NodeState.STOPPED, terminated_at=now)
        if problems:
            raise ProviderError(
                "could not stop the engines on "
                + "; ".join(problems)
                + ". Stop them there (`cluster ssh NODE`) or run `cluster remove` again"
            )

    def stop(self, cluster: ClusterRecord, ipp_cluster) -> None:
        stored = {n.node_id for n in self.store.nodes.of(cluster.id)}
        # the configured hosts too: engines of this cluster may run where the store does not know
        hosts = {str(h): h for h in self.hosts()} if self.config.ssh.hosts else {}
        for node_id in stored - set(hosts):
            hosts[node_id] = SshTarget.parse(node_id, self.config.ssh.user, self.config.ssh.key_file)
        problems = self.engines().stop(cluster.id, list(hosts.values()))
        failed = {problem.split(": ", 1)[0] for problem in problems}
        lost = {n.node_id for n in self.store.nodes.of(cluster.id) if n.state == NodeState.LOST}
        for node in self.store.nodes.of(cluster.id):
            if node.state not in (NodeState.STOPPED, NodeState.LOST) and node.node_id not in failed:
                node.state, node.terminated_at = NodeState.STOPPED, time.time()
                self.store.nodes.put(cluster.id, node)
        # a host lost while the master was away may never answer again: its engines quit after their grace
        for problem in [p for p in problems if p.split(": ", 1)[0] in lost]:
            log.warning("could not stop the engines on lost host %s (they quit after master_grace_minutes)", problem)
        problems = [p for p in problems if p.split(": ", 1)[0] not in lost]
        if problems:  # engines may still run there: say so, and let `cluster stop` be run again
            raise ProviderError(
                "could not stop the engines on "
                + "; ".join(problems)
                + ". Run `cluster stop` again once the hosts answer, or stop them there (`cluster ssh NODE`)."
            )

    def release_orphans(
        self, name: str, everything: bool = False, any_owner: bool = False, only: Optional[set[str]] = None
    ) -> list[str]:
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
        host = SshTarget.parse(node.node_id, self.config.ssh.user, self.config.ssh.key_file)
        return dataclasses.replace(
            host,
            key_file=str(Path(host.key_file).expanduser()) if host.key_file else "",
            known_hosts=str(self.known_hosts()),
        )

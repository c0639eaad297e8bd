"""The provider interface: a few verbs, records in and out.

A provider brings up slaves for a cluster whose controller already runs on
the master, starts engines on them that register with that controller, lists
the slaves, names an SSH target for each, and releases them all again; after the master restarted, a new
controller adopts the slaves still up.
"""

from __future__ import annotations

import abc
import builtins
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Optional

from controller.errors import ProviderError

if TYPE_CHECKING:
    import ipyparallel as ipp

    from controller.config import Config
    from controller.store import ClusterRecord, NodeRecord, Store


@dataclass(frozen=True)
class SshTarget:
    """Where a node's sshd listens and how to log in: the one SSH endpoint type (bootstrap, tunnels, stop,
    `cluster ssh`). ``known_hosts``: the file its host key is checked against, for an ``ssh`` command line."""

    address: str
    port: int = 22
    user: str = ""
    key_file: str = ""
    known_hosts: str = ""

    @classmethod
    def parse(cls, text: str, user: str = "", key_file: str = "") -> "SshTarget":
        """``host`` or ``host:port`` (an IPv6 address in brackets: ``[::1]:2222``)."""
        text = text.strip()
        address, port = text, 22
        if text.startswith("["):
            address, _, rest = text[1:].partition("]")
            if rest.startswith(":"):
                port = int(rest[1:])
        elif text.count(":") == 1:
            address, port_text = text.split(":")
            port = int(port_text)
        return cls(address=address, port=port, user=user, key_file=key_file)

    def __str__(self) -> str:
        return self.address if self.port == 22 else f"{self.address}:{self.port}"

    def command(self) -> list[str]:
        """An ``ssh`` command line that reaches the node, host keys checked."""
        cmd = ["ssh", "-p", str(self.port)]
        if self.key_file:
            cmd += ["-i", self.key_file]
        if self.known_hosts:
            cmd += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        cmd.append(f"{self.user}@{self.address}" if self.user else self.address)
        return cmd


@dataclass(frozen=True)
class Resource:
    """Something a provider found by its tags and would release (``stop --all`` lists them first)."""

    kind: str  # instance, security-group, key-pair, host, process
    id: str
    cluster: str = ""
    owner: str = ""  # user@host of the master that created it
    detail: str = ""


def _no_step(step: str) -> None:
    """The production ``on_step``: nothing."""


@dataclass(frozen=True)
class Hooks:
    """Test hooks, passed to a provider's constructor; the defaults do nothing (production).

    ``on_step`` is called after each step of ``start``/``add`` (a provider names its steps in
    ``STEPS``), so a test can fail or interrupt a start at an exact point. ``address`` maps a cloud
    instance to where SSH reaches it, ``(instance, key_file) -> (address, port)``: moto's instances
    never boot, so the aws tests map each to a network-namespace host with a real sshd.
    ``waiter_delay``: seconds between polls of the cloud while waiting for instances (moto answers at once).
    """

    on_step: Callable[[str], None] = _no_step
    address: Optional[Callable[[dict, str], tuple[str, int]]] = None
    waiter_delay: float = 5.0


NO_HOOKS = Hooks()


class Provider(abc.ABC):
    """Base of every provider. Subclasses set ``name`` and implement the verbs.

    A provider keeps no state between verbs: each verb reads the config, the store and the cloud,
    so ``start``, ``list``, ``add``, ``remove`` and ``stop`` may each be called on a fresh object.
    """

    name: ClassVar[str]
    # the steps of ``start`` after which ``Hooks.on_step`` is called, in order
    STEPS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: "Config", store: "Store", hooks: Hooks = NO_HOOKS):
        self.config = config
        self.store = store
        self.hooks = hooks

    @abc.abstractmethod
    def start(self, cluster: "ClusterRecord", ipp_cluster: "ipp.Cluster", slaves: int) -> list["NodeRecord"]:
        """Bring up ``slaves`` slaves and start their engines; return the nodes (also stored).

        If it raises (Ctrl-C included), whatever it created is already released.
        """

    def prepare(self, cluster: "ClusterRecord") -> None:
        """Begin, before the controller starts, what can overlap its start (local: the engine fork server's
        imports). Nothing to undo: whatever it starts ends with the cluster's other processes."""

    @abc.abstractmethod
    def add(self, cluster: "ClusterRecord", ipp_cluster: "ipp.Cluster", count: int) -> list["NodeRecord"]:
        """Bring up ``count`` more slaves of a running cluster and start their engines (``start`` is this on an
        empty cluster); return the new nodes (also stored). If it raises, what it created is released."""

    @abc.abstractmethod
    def adopt(
        self, cluster: "ClusterRecord", ipp_cluster: "ipp.Cluster", nodes: list["NodeRecord"]
    ) -> list["NodeRecord"]:
        """A new controller (``ipp_cluster``, already running) takes over ``nodes``: the cluster's nodes still up
        after the master restarted, whose engines wait for the old, dead controller. Their old engines are
        stopped and new ones started against the new controller; nothing is launched or released. Returns
        the nodes adopted (also stored); the others are recorded ``lost`` (and released where they bill).

        If it raises (Ctrl-C included), nothing is half-done on the master and every node is still recorded:
        the caller releases them all, as after a failed ``start``."""

    @abc.abstractmethod
    def remove(self, cluster: "ClusterRecord", ipp_cluster: Optional["ipp.Cluster"], nodes: list["NodeRecord"]) -> None:
        """Stop the engines of these nodes and release them (the caller drained them first); the others go on."""

    @abc.abstractmethod
    def stop(self, cluster: "ClusterRecord", ipp_cluster: Optional["ipp.Cluster"]) -> None:
        """Stop the engines and release every node; safe twice, and with ``ipp_cluster`` lost."""

    @abc.abstractmethod
    def list(self, cluster: "ClusterRecord") -> list["NodeRecord"]:
        """The cluster's nodes as the provider sees them now (the cloud's tags are the truth)."""

    def failing_health_checks(self, cluster: "ClusterRecord") -> dict[str, str]:
        """Node id -> the provider's health check it fails now, for nodes whose engines may still answer
        (a cloud's own status checks). Engines that die are noticed by the controller's heartbeat on
        every provider; local and ssh nodes have no check beyond it."""
        return {}

    def engine_data_dir(self) -> str:
        """data_dir as the engines see it: the master's own for local engines; remote providers name
        a directory on the slave (the master's paths mean nothing there)."""
        return str(self.config.data_dir)

    def preflight(self, slaves: int, adopting: bool = False) -> str:
        """Check configuration and credentials before anything (the controller included) is started;
        return the address the controller's engine ports must listen on (loopback unless engines on
        other machines connect to it directly). ``adopting``: the cluster's nodes are up already (``adopt``
        follows), so what refuses a second set of them does not apply."""
        return "127.0.0.1"

    def find_orphans(self, name: str, everything: bool = False, any_owner: bool = False) -> builtins.list[Resource]:
        """What ``release_orphans`` with these arguments would release."""
        return []

    def release_orphans(
        self, name: str, everything: bool = False, any_owner: bool = False, only: Optional[set[str]] = None
    ) -> builtins.list[str]:
        """Release nodes found by the provider's own tags when the store has no record of them
        (local state lost), or of every cluster of this owner with ``everything`` (of anyone with
        ``any_owner``); ``only``: just these ids. Returns what was released."""
        return []

    def expected_engines(self, nodes: builtins.list["NodeRecord"]) -> int:
        """How many engines should register once ``start`` returned these nodes."""
        return sum(node.engines for node in nodes)

    def ssh_target(self, node: "NodeRecord") -> SshTarget:
        raise ProviderError(f"provider {self.name!r} has no SSH access to its nodes")

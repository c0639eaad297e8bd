"""The keeper's decisions, as a pure function of what it saw and the time (no process, no provider).

Each tick the keeper (controller/cluster/keeper.py) builds a :class:`Snapshot` and asks
:meth:`Policy.decide` what to do; the policy remembers only what a decision needs across ticks
(since when a node is idle, since when its engines are missing, when a failed add may be tried again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from controller.store.records import NodeState

# instance states (from the provider's list) of a slave that is gone or going: it will never serve again
ENDED = (NodeState.TERMINATED, NodeState.STOPPED, NodeState.STOPPING, NodeState.SHUTTING_DOWN, NodeState.GONE)


@dataclass(frozen=True)
class NodeView:
    """One serving node as the keeper sees it now."""

    node_id: str
    engines: int  # engines it should have
    alive: int  # of them registered with the controller now
    busy: bool  # an engine of it runs or holds a task
    notice: bool = False  # an engine of it is under a spot interruption notice
    instance_state: str = NodeState.RUNNING  # the provider's word (aws: EC2's state; local/ssh: the store's)
    failing: str = ""  # the provider's health check it fails, if any (aws: EC2's status checks)
    launched_at: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    now: float
    target: int
    nodes: list[NodeView]
    wanted: int = 0  # jobs the masters could run at once (running, ready, not yet started)
    engines_per_node: int = 1
    min_slaves: int = 0
    max_slaves: int = 0  # 0: no autoscaling
    idle_minutes: float = 0.0
    replace_lost: bool = True


@dataclass(frozen=True)
class Release:
    node_id: str
    why: str
    drain: bool  # False: the node is lost, there is nothing to drain


@dataclass
class Decision:
    target: int
    add: int = 0
    add_why: str = ""
    replaces: str = ""  # node ids the added ones replace
    release: list[Release] = field(default_factory=list)
    target_why: str = ""

    @property
    def acts(self) -> bool:
        return bool(self.add or self.release)


@dataclass
class Policy:
    """``lost_after_s``: a node with no engine registered for this long is lost (an engine restarting, or
    joining right after an add, is not); ``backoff_s``: the first wait after a failed add, doubled per failure."""

    lost_after_s: float = 3.0
    backoff_s: float = 15.0
    max_backoff_s: float = 600.0
    idle_since: dict[str, float] = field(default_factory=dict)
    missing_since: dict[str, float] = field(default_factory=dict)
    retry_at: float = 0.0
    failures: int = 0

    def decide(self, snap: Snapshot) -> Decision:
        self._observe(snap)
        lost = {n.node_id: why for n in snap.nodes for why in [self._lost(n, snap.now)] if why}
        # nodes that still serve but must go: drained first, so their tasks checkpoint and move
        leaving = {n.node_id: self._leaving(n) for n in snap.nodes if n.node_id not in lost and self._leaving(n)}
        healthy = [n for n in snap.nodes if n.node_id not in lost and n.node_id not in leaving]
        decision = Decision(target=snap.target)
        idle_off = self._autoscale(snap, healthy, decision) if snap.max_slaves else []
        decision.release += idle_off
        if snap.replace_lost:
            decision.release += [Release(node_id, why, drain=False) for node_id, why in lost.items()]
            decision.release += [Release(node_id, why, drain=True) for node_id, why in leaving.items()]
        missing = decision.target - (len(healthy) - len(idle_off))
        if missing > 0 and (snap.replace_lost or snap.max_slaves) and snap.now >= self.retry_at:
            replaced = (
                [n.node_id for n in snap.nodes if n.node_id in lost or n.node_id in leaving]
                if snap.replace_lost
                else []
            )
            reasons = [f"{lost.get(r) or leaving[r]} on {r}" for r in replaced[:missing]]
            if decision.target_why:
                reasons.append(decision.target_why)
            decision.add = missing
            decision.replaces = ", ".join(replaced[:missing])
            decision.add_why = "; ".join(reasons) or f"{len(healthy)} of the target {decision.target} slave(s) serve"
        return decision

    def _observe(self, snap: Snapshot) -> None:
        seen = {n.node_id for n in snap.nodes}
        for node in snap.nodes:
            if node.busy or node.alive == 0:
                self.idle_since.pop(node.node_id, None)
            else:
                self.idle_since.setdefault(node.node_id, snap.now)
            if node.alive == 0 and node.engines > 0:
                self.missing_since.setdefault(node.node_id, snap.now)
            else:
                self.missing_since.pop(node.node_id, None)
        for table in (self.idle_since, self.missing_since):
            for node_id in set(table) - seen:
                del table[node_id]

    def _lost(self, node: NodeView, now: float) -> str:
        if node.instance_state in ENDED:
            return f"instance {node.instance_state}"
        if node.failing and node.alive == 0:  # nothing left to drain
            return f"failed its health check ({node.failing})"
        since = self.missing_since.get(node.node_id)
        if since is not None and now - since >= self.lost_after_s:
            return "engines died" if node.instance_state == NodeState.RUNNING else f"no engine ({node.instance_state})"
        return ""

    @staticmethod
    def _leaving(node: NodeView) -> str:
        """Why a node that still serves must be drained and replaced ('' if it need not)."""
        if node.notice:
            return "spot notice"
        return f"failed its health check ({node.failing})" if node.failing else ""

    def _autoscale(self, snap: Snapshot, healthy: list[NodeView], decision: Decision) -> list[Release]:
        """Sets the target from the demand; returns the idle nodes to turn off."""
        floor, ceiling = snap.min_slaves, snap.max_slaves
        needed = math.ceil(snap.wanted / max(1, snap.engines_per_node))
        target = min(max(snap.target, floor), ceiling)
        off: list[NodeView] = []
        if needed > len(healthy):
            target = max(target, min(needed, ceiling))
        else:
            keep = max(floor, needed)
            expired = sorted(
                (self.idle_since[n.node_id], n.node_id, n)
                for n in healthy
                if n.node_id in self.idle_since and snap.now - self.idle_since[n.node_id] >= snap.idle_minutes * 60
            )
            off = [n for _, _, n in expired][: max(0, len(healthy) - keep)]
            if off:
                target = len(healthy) - len(off)
        if target != snap.target:
            cause = (
                f"{len(off)} slave(s) idle for {snap.idle_minutes:g} min"
                if off
                else f"{snap.wanted} job(s) want engines, {len(healthy)} slave(s) serve"
            )
            decision.target_why = (
                f"{cause}: target {snap.target} -> {target} (min_slaves {floor}, max_slaves {ceiling})"
            )
        decision.target = target
        return [
            Release(n.node_id, f"idle for {(snap.now - self.idle_since[n.node_id]) / 60:.2f} min", drain=True)
            for n in off
        ]

    def add_failed(self, now: float) -> float:
        """A failed add (capacity, a slave that never answered): returns when to try again."""
        self.failures += 1
        self.retry_at = now + min(self.max_backoff_s, self.backoff_s * 2 ** (self.failures - 1))
        return self.retry_at

    def add_succeeded(self) -> None:
        self.failures, self.retry_at = 0, 0.0

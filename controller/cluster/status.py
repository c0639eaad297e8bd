"""What ``cluster status`` shows: a snapshot of the cluster from the store, its controller and its provider.

The store says what was started; the controller's hub says which engines are registered and busy; the
provider says which nodes still run (and bill). After the controller died, the snapshot carries a hint:
what still runs and how to go on.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from controller.config import Config
from controller.ipp import processes
from controller.ipp.client import connect_client
from controller.ipp.launch import controller_alive
from controller.ipp.profile import url_file
from controller.store import (
    LIVE_NODE_STATES,
    PENDING_NODE_STATES,
    RELEASED_NODE_STATES,
    ClusterRecord,
    EngineRecord,
    EventRecord,
    NodeRecord,
    NodeState,
    Store,
)

if TYPE_CHECKING:
    from controller.providers import Provider


@dataclass
class EngineStatus:
    id: int
    host: str
    pid: int
    device: str
    threads: int
    state: str  # idle, busy, dead, unregistered, removed
    uptime_s: float
    queued: int = 0
    node_id: str = ""
    leaving: str = ""  # drain, notice, lost: it gets no new task


@dataclass
class ClusterStatus:
    name: str
    state: str  # running, degraded, stopped, failed, none
    provider: str = ""
    # the size: the slaves it keeps (`scale`, the autoscaler), those serving now and those still coming up
    target: Optional[int] = None
    current: int = 0
    pending: int = 0
    autoscale: dict = field(default_factory=dict)  # min_slaves, max_slaves, idle_minutes (max 0: off)
    replace_lost: bool = False
    keeper: dict = field(default_factory=dict)  # pid, state
    idle_stops: dict = field(default_factory=dict)  # node id -> when autoscaling turns it off (epoch seconds)
    events: list[EventRecord] = field(default_factory=list)  # the latest resize decisions, with their reasons
    cluster_id: Optional[int] = None
    profile_dir: str = ""
    url_file: str = ""
    controller: dict = field(default_factory=dict)
    engines: list[EngineStatus] = field(default_factory=list)
    nodes: list[NodeRecord] = field(default_factory=list)
    created_at: Optional[float] = None
    uptime_s: float = 0.0
    price_per_hour: float = 0.0
    cost_so_far: float = 0.0
    error: Optional[str] = None
    hint: str = ""  # what to do next, when the cluster cannot go on as it is

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def snapshot(name: str, config: Config, store: Store, provider: "Callable[[str], Provider]") -> ClusterStatus:
    """The cluster ``name`` now; ``provider``: the provider of a name (it lists the nodes)."""
    record = store.clusters.active(name)
    if record is None:
        last = store.clusters.latest(name)
        return ClusterStatus(name=name, state="stopped" if last else "none", error=last.error if last else None)
    profile = Path(record.profile_dir)
    url = url_file(profile, record.ipp_cluster_id)
    alive = controller_alive(record)
    nodes = provider(record.provider).list(record)
    engines = engine_states(record, store, nodes, url if alive else None)
    serving = [e for e in engines if e.state != "removed"]
    if not alive:
        state = "failed"
    elif record.state != "running" or all(e.state in ("idle", "busy") for e in serving):
        state = record.state
    else:
        state = "degraded"
    now = time.time()
    uptime = now - record.created_at
    price = sum(n.price_per_hour for n in nodes if n.state not in RELEASED_NODE_STATES)
    live = [n for n in nodes if n.state in LIVE_NODE_STATES and n.state not in PENDING_NODE_STATES]
    idle_stops = {}
    if record.max_slaves and len(live) > record.min_slaves:
        idle_stops = {n.node_id: n.idle_since + record.idle_minutes * 60 for n in live if n.idle_since}
    keeper_alive = processes.is_marked(record.keeper_pid, profile, record.ipp_cluster_id)
    return ClusterStatus(
        name=name,
        state=state,
        provider=record.provider,
        cluster_id=record.id,
        profile_dir=str(profile),
        url_file=str(url),
        target=record.target if record.target is not None else record.slaves,
        current=len(live),
        pending=sum(n.state in PENDING_NODE_STATES for n in nodes),
        autoscale={
            "min_slaves": record.min_slaves or 0,
            "max_slaves": record.max_slaves or 0,
            "idle_minutes": record.idle_minutes or 0.0,
        },
        replace_lost=bool(record.replace_lost),
        keeper={
            "pid": record.keeper_pid,
            "state": "running" if keeper_alive else ("dead" if record.keeper_pid else "none"),
        },
        idle_stops=idle_stops,
        events=store.events.latest(record.id, limit=10),
        controller={"pid": record.controller_pid, "state": "running" if alive else "dead"},
        engines=engines,
        nodes=nodes,
        created_at=record.created_at,
        uptime_s=uptime,
        price_per_hour=price,
        cost_so_far=price * uptime / 3600,
        error=record.error,
        hint=controller_lost_hint(config, store, record, nodes) if not alive else "",
    )


def engine_states(
    record: ClusterRecord, store: Store, nodes: list[NodeRecord], url: Optional[Path]
) -> list[EngineStatus]:
    """Every stored engine with its state: from the hub at ``url`` (None: the controller is gone), its
    process (local slaves), and its node (an engine of a released node is ``removed``)."""
    registered, queues = _registered_engines(url) if url is not None else (set(), {})
    leaving = store.engines.leaving(record.id)
    released = {n.node_id for n in nodes if n.state in RELEASED_NODE_STATES}
    now = time.time()
    return [
        EngineStatus(
            id=engine.engine_id,
            host=engine.host,
            pid=engine.pid,
            device=engine.device,
            threads=engine.threads,
            state=_engine_state(record, engine, registered, queues, released),
            node_id=engine.node_id or "",
            uptime_s=now - (engine.registered_at or now),
            queued=queues.get(engine.engine_id, {}).get("queue", 0),
            leaving=leaving.get(engine.engine_id, ""),
        )
        for engine in store.engines.of(record.id)
    ]


def _engine_state(
    record: ClusterRecord, engine: EngineRecord, registered: set[int], queues: dict, released: set[str]
) -> str:
    if record.provider == "local" and not processes.is_marked(
        engine.pid, Path(record.profile_dir), record.ipp_cluster_id
    ):
        state = "dead"
    elif engine.engine_id not in registered:
        state = "unregistered"
    else:
        queue = queues.get(engine.engine_id, {})
        return "busy" if queue.get("tasks", 0) or queue.get("queue", 0) else "idle"
    return "removed" if engine.node_id in released else state


def _registered_engines(url: Path) -> tuple[set[int], dict]:
    """The engine ids the hub knows, and their queues (nothing when it does not answer within 5 s)."""
    try:
        client = connect_client(url, timeout=5)
    except Exception:  # noqa: BLE001 - a controller that does not answer, whatever the error, shows no engine
        return set(), {}
    try:
        queues = client.queue_status()
        return set(client.ids), {k: v for k, v in queues.items() if isinstance(k, int)}
    finally:
        client.close()


def controller_lost_hint(config: Config, store: Store, record: ClusterRecord, nodes: list[NodeRecord]) -> str:
    """After the master restarted (or its controller died): what still runs and bills, and how to go on.

    ``cluster start`` adopts the nodes still up (a new controller, new engines on the same slaves,
    the same cluster record: docs/elastic.md); then the runs and sweeps that were running resume
    from their checkpoints.
    """
    up = [n for n in nodes if n.state not in (*RELEASED_NODE_STATES, NodeState.SHUTTING_DOWN)]
    parts = ["the controller is gone (the master restarted, or it was killed)"]
    remote = record.provider != "local"
    if up and remote:
        parts.append(
            f"{len(up)} node(s) still up and billed; their engines wait "
            f"{config.cluster.master_grace_minutes:g} min for a controller, then quit"
        )
    runs = [r for r in store.runs.all(limit=200) if r.cluster_id == record.id and r.state in ("running", "interrupted")]
    sweeps = sorted({r.sweep_id for r in runs if r.sweep_id})
    resume = [f"`cluster sweep --resume {s}`" for s in sweeps]
    resume += [f"`cluster train --resume {r.id}`" for r in runs if not r.sweep_id]
    then = (", then " + " and ".join(resume)) if resume else ""
    if up and remote:
        parts.append(
            f"run `cluster start` (it adopts them: a new controller, new engines on the same "
            f"slaves){then}; `cluster start --fresh` releases them and starts new ones, "
            f"`cluster stop` ends them"
        )
    else:
        parts.append(f"run `cluster start` (it starts the engines again for this cluster){then}")
    return "; ".join(parts)

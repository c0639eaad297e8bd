"""What the store keeps of clusters: their rows, their nodes and engines, resize decisions, the masters' demand."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

from controller.store.database import Database, row_to
from controller.store.records import ClusterRecord, EngineRecord, EventRecord, NodeRecord


class ClusterTable:
    """One row per ``cluster start``; the newest of a name that is not stopped is the active one."""

    def __init__(self, db: Database):
        self.db = db

    def create(
        self,
        *,
        name: str,
        provider: str,
        slaves: int,
        threads_per_engine: int,
        profile_dir: str,
        ipp_cluster_id: str,
        price_per_hour: float = 0.0,
    ) -> ClusterRecord:
        cursor = self.db.insert(
            "clusters",
            dict(
                name=name,
                provider=provider,
                state="starting",
                slaves=slaves,
                threads_per_engine=threads_per_engine,
                profile_dir=profile_dir,
                ipp_cluster_id=ipp_cluster_id,
                created_at=time.time(),
                price_per_hour=price_per_hour,
            ),
        )
        assert cursor.lastrowid is not None  # an INSERT into an AUTOINCREMENT table
        return self.get(cursor.lastrowid)

    def get(self, cluster_id: int) -> ClusterRecord:
        row = self.db.execute("SELECT * FROM clusters WHERE id = ?", (cluster_id,)).fetchone()
        if row is None:
            raise KeyError(f"no cluster {cluster_id} in {self.db.path}")
        return row_to(ClusterRecord, row)

    def active(self, name: str) -> Optional[ClusterRecord]:
        """The newest cluster of this name that is not stopped (starting, running, stopping, failed)."""
        row = self.db.execute(
            "SELECT * FROM clusters WHERE name = ? AND state != 'stopped' ORDER BY id DESC LIMIT 1", (name,)
        ).fetchone()
        return row_to(ClusterRecord, row) if row else None

    def latest(self, name: str) -> Optional[ClusterRecord]:
        row = self.db.execute("SELECT * FROM clusters WHERE name = ? ORDER BY id DESC LIMIT 1", (name,)).fetchone()
        return row_to(ClusterRecord, row) if row else None

    def all(self) -> list[ClusterRecord]:
        return [row_to(ClusterRecord, r) for r in self.db.execute("SELECT * FROM clusters ORDER BY id")]

    def update(self, cluster_id: int, **values: Any) -> None:
        self.db.update("clusters", {"id": cluster_id}, values)

    def set_state(self, cluster_id: int, state: str, error: Optional[str] = None) -> None:
        values: dict[str, Any] = {"state": state}
        if state == "stopped":
            values["stopped_at"] = time.time()
        if error is not None:
            values["error"] = error
        self.db.update("clusters", {"id": cluster_id}, values)


class NodeTable:
    """A cluster's slaves (a process group, an SSH host, an instance), kept after they are released."""

    def __init__(self, db: Database):
        self.db = db

    def put(self, cluster_id: int, node: NodeRecord) -> None:
        """Insert the node, or replace the row of the same id."""
        self.db.insert("nodes", {"cluster_id": cluster_id, **dataclasses.asdict(node)}, replace=True)

    def of(self, cluster_id: int) -> list[NodeRecord]:
        rows = self.db.execute("SELECT * FROM nodes WHERE cluster_id = ? ORDER BY launched_at, node_id", (cluster_id,))
        return [row_to(NodeRecord, r) for r in rows]

    def update(self, cluster_id: int, node_id: str, **values: Any) -> None:
        self.db.update("nodes", {"cluster_id": cluster_id, "node_id": node_id}, values)


class EngineTable:
    """A cluster's engines as they registered, and which of them are leaving (no master sends them work)."""

    def __init__(self, db: Database):
        self.db = db

    def put(self, cluster_id: int, engines: list[EngineRecord]) -> None:
        """Insert the engines, or replace the rows of the same ids."""
        for engine in engines:
            self.db.insert("engines", {"cluster_id": cluster_id, **dataclasses.asdict(engine)}, replace=True)

    def of(self, cluster_id: int) -> list[EngineRecord]:
        rows = self.db.execute("SELECT * FROM engines WHERE cluster_id = ? ORDER BY engine_id", (cluster_id,))
        return [row_to(EngineRecord, r) for r in rows]

    def forget(self, cluster_id: int) -> None:
        """Drop every engine row of the cluster (a new controller numbers its engines afresh)."""
        self.db.execute("DELETE FROM engines WHERE cluster_id = ?", (cluster_id,))

    def mark_leaving(self, cluster_id: int, engine_id: int, reason: str) -> None:
        """The engine gets no new task from any master (``reason``: drain, notice, lost; "" calls it off)."""
        self.db.update("engines", {"cluster_id": cluster_id, "engine_id": engine_id}, {"leaving": reason or None})

    def leaving(self, cluster_id: int) -> dict[int, str]:
        """engine id -> why it is leaving, for the engines that are."""
        rows = self.db.execute(
            "SELECT engine_id, leaving FROM engines WHERE cluster_id = ? AND leaving IS NOT NULL AND leaving != ''",
            (cluster_id,),
        )
        return {row["engine_id"]: row["leaving"] for row in rows}


class RemoteEngineTable:
    """The engines started on SSH-reached nodes, by pid: what a stop signals there, local state or not."""

    def __init__(self, db: Database):
        self.db = db

    def add(self, cluster_id: int, node_id: str, pids: list[int], remote_dir: str) -> None:
        for pid in pids:
            self.db.execute(
                "INSERT OR REPLACE INTO remote_engines VALUES (?, ?, ?, ?)", (cluster_id, node_id, pid, remote_dir)
            )

    def pids(self, cluster_id: int) -> dict[str, tuple[int, ...]]:
        """Node id -> the pids of the engines started there for the cluster, as recorded at their start."""
        found: dict[str, tuple[int, ...]] = {}
        for node_id, pid in self.db.execute(
            "SELECT node_id, pid FROM remote_engines WHERE cluster_id = ?", (cluster_id,)
        ):
            found[node_id] = (*found.get(node_id, ()), pid)
        return found

    def forget(self, cluster_id: int, node_id: Optional[str] = None) -> None:
        """Drop the rows of the cluster's engines (of one node only, when given)."""
        if node_id is None:
            self.db.execute("DELETE FROM remote_engines WHERE cluster_id = ?", (cluster_id,))
        else:
            self.db.execute("DELETE FROM remote_engines WHERE cluster_id = ? AND node_id = ?", (cluster_id, node_id))


class EventTable:
    """Resize decisions and faults handled, with their reasons (``cluster status`` shows the latest)."""

    def __init__(self, db: Database):
        self.db = db

    def add(self, cluster_id: int, kind: str, detail: str) -> EventRecord:
        event = EventRecord(cluster_id=cluster_id, at=time.time(), kind=kind, detail=detail)
        self.db.insert("events", dataclasses.asdict(event))
        return event

    def latest(self, cluster_id: int, limit: int = 20) -> list[EventRecord]:
        """The newest ``limit`` events, oldest first."""
        rows = self.db.execute(
            "SELECT * FROM events WHERE cluster_id = ? ORDER BY id DESC LIMIT ?", (cluster_id, limit)
        )
        return [row_to(EventRecord, r) for r in reversed(rows.fetchall())]


class DemandTable:
    """How many jobs each master's scheduler could run at once: what the keeper autoscales to."""

    def __init__(self, db: Database):
        self.db = db

    def set(self, cluster_id: int, holder: str, wanted: Optional[int]) -> None:
        """``holder``'s demand now (None: it ended, forget it)."""
        if wanted is None:
            self.db.execute("DELETE FROM demand WHERE cluster_id = ? AND holder = ?", (cluster_id, holder))
        else:
            self.db.insert(
                "demand", dict(cluster_id=cluster_id, holder=holder, wanted=wanted, at=time.time()), replace=True
            )

    def total(self, cluster_id: int, fresh_s: float) -> int:
        """Jobs wanted by every master that reported within ``fresh_s`` seconds (a killed master's row ages out)."""
        row = self.db.execute(
            "SELECT COALESCE(SUM(wanted), 0) FROM demand WHERE cluster_id = ? AND at >= ?",
            (cluster_id, time.time() - fresh_s),
        ).fetchone()
        return int(row[0])

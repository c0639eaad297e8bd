"""The embedded store: one SQLite file under state_dir, plus checkpoint files beside it.

Contract:
- It is the single source for ``status``, ``runs`` and reports; every write is
  committed before the method returns, unless it runs inside ``Store.transaction()``.
- One ``Store`` object is used from one thread.  Several processes may open the
  same file (WAL mode, a busy timeout), e.g. ``cluster runs`` while a sweep writes.
- Checkpoint files are written to a temporary name and renamed, so a reader
  never sees half a checkpoint; only a run's newest checkpoint is kept
  (``checkpoints.py`` says when files go).

Each table is a small class over the one connection, reached by its name:
``store.runs.get(run_id)``, ``store.engines.leaving(cluster_id)``. Subsystems with
tables of their own (sweeps, bench, leases) build theirs the same way over the
``Store``. Every table's DDL is in controller/store/schema.py.
"""

from __future__ import annotations

from pathlib import Path

from controller.store.checkpoints import CheckpointError, CheckpointFiles, fsync_dir
from controller.store.clusters import ClusterTable, DemandTable, EngineTable, EventTable, NodeTable, RemoteEngineTable
from controller.store.database import Database, StoreBusyError, load_json
from controller.store.records import (
    LIVE_NODE_STATES,
    PENDING_NODE_STATES,
    RELEASED_NODE_STATES,
    RUN_STATES,
    ClusterRecord,
    EngineRecord,
    EpochRecord,
    EventRecord,
    NodeRecord,
    NodeState,
    RunRecord,
    new_id,
)
from controller.store.runs import EpochTable, RunTable

__all__ = [
    "LIVE_NODE_STATES",
    "PENDING_NODE_STATES",
    "RELEASED_NODE_STATES",
    "NodeState",
    "RUN_STATES",
    "CheckpointError",
    "CheckpointFiles",
    "ClusterRecord",
    "Database",
    "EngineRecord",
    "EpochRecord",
    "EventRecord",
    "NodeRecord",
    "RunRecord",
    "Store",
    "StoreBusyError",
    "fsync_dir",
    "load_json",
    "new_id",
]


class Store(Database):
    """SQLite under ``state_dir`` with its tables: clusters, nodes, engines, events, demand, runs, epochs,
    and the checkpoint files."""

    def __init__(self, state_dir: Path):
        super().__init__(state_dir)
        self.clusters = ClusterTable(self)
        self.nodes = NodeTable(self)
        self.engines = EngineTable(self)
        self.remote_engines = RemoteEngineTable(self)
        self.events = EventTable(self)
        self.demand = DemandTable(self)
        self.runs = RunTable(self)
        self.epochs = EpochTable(self)
        self.checkpoints = CheckpointFiles(self, self.state_dir / "checkpoints")

    def __enter__(self) -> "Store":
        return self

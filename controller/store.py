"""The embedded store: one SQLite file under state_dir, plus checkpoint files beside it.

Contract:
- It is the single source for ``status``, ``runs`` and reports; every write is
  committed before the method returns.
- One ``Store`` object is used from one thread.  Several processes may open the
  same file (WAL mode, a busy timeout), e.g. ``cluster runs`` while a sweep writes.
- Checkpoint files are written to a temporary name and renamed, so a reader
  never sees half a checkpoint; only a run's newest checkpoint is kept.
"""
from __future__ import annotations

import dataclasses
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from . import schema
from .errors import ClusterStateError, DataError

log = logging.getLogger(__name__)

# how long a write waits for another process's transaction before the store is reported busy
BUSY_TIMEOUT_S = 30.0


class CheckpointError(DataError):
    """A stored checkpoint is missing or does not match its hash."""


class StoreBusyError(ClusterStateError):
    """Another process held the store's write lock for longer than the busy timeout."""


def load_json(text: Optional[str], where: str) -> Any:
    """A JSON column, or a DataError naming the store and the row (edited or damaged outside `cluster`)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError) as error:
        raise DataError(f"{where} is not valid JSON ({error}); the row was changed outside `cluster`: "
                        f"restore the file from a backup or delete that row") from None


class _Connection(sqlite3.Connection):
    """sqlite3's errors as ours: a lock held too long, a damaged file; other errors unchanged."""

    store_path = ""

    def execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:  # type: ignore[override]
        try:
            return super().execute(sql, params)
        except sqlite3.DatabaseError as error:
            raise self._ours(error) from None

    def executescript(self, script: str) -> sqlite3.Cursor:  # type: ignore[override]
        try:
            return super().executescript(script)
        except sqlite3.DatabaseError as error:
            raise self._ours(error) from None

    def _ours(self, error: sqlite3.DatabaseError) -> Exception:
        text = str(error)
        if "locked" in text or "busy" in text:
            return StoreBusyError(
                f"{self.store_path}: the store stayed locked by another process for {BUSY_TIMEOUT_S:.0f} s "
                f"(another `cluster` command is writing, or hung); try again when it ends")
        if "malformed" in text or "not a database" in text:
            return DataError(f"{self.store_path}: the store is damaged ({text}); restore it from a backup "
                             f"or move it away (the history is then lost)")
        return error


RUN_STATES = ("running", "completed", "failed", "interrupted", "pruned")


@dataclass
class ClusterRecord:
    id: int
    name: str
    provider: str
    state: str
    slaves: int
    threads_per_engine: int
    profile_dir: str
    ipp_cluster_id: str
    created_at: float
    controller_pid: Optional[int] = None
    stopped_at: Optional[float] = None
    price_per_hour: float = 0.0
    error: Optional[str] = None
    target: Optional[int] = None  # slaves to keep; None: as started (a store from before resizing)
    min_slaves: int = 0
    max_slaves: int = 0  # 0: no autoscaling
    idle_minutes: float = 0.0
    replace_lost: bool = False
    keeper_pid: Optional[int] = None


@dataclass
class EngineRecord:
    engine_id: int
    host: str
    pid: int
    device: str
    threads: int
    node_id: str = ""
    registered_at: float = 0.0
    leaving: str = ""  # drain, notice, lost: the scheduler sends it no new task


@dataclass
class NodeRecord:
    node_id: str
    provider: str
    host: str = ""
    state: str = ""
    instance_id: str = ""
    instance_type: str = ""
    zone: str = ""
    market: str = ""
    price_per_hour: float = 0.0
    public_ip: str = ""
    private_ip: str = ""
    image: str = ""
    engines: int = 0
    launched_at: float = 0.0
    terminated_at: Optional[float] = None
    ssh_host: str = ""  # where bootstrap reached it over SSH: `cluster ssh` and stop use the same address
    ssh_port: int = 0
    idle_since: Optional[float] = None  # every engine idle since then (autoscaling stops it after idle_minutes)
    note: str = ""  # why it was started or released


@dataclass
class EventRecord:
    """A resize decision or a fault handled, with its reason (shown by `cluster status`)."""

    cluster_id: int
    at: float
    kind: str
    detail: str


@dataclass
class RunRecord:
    id: str
    params: dict
    state: str = "running"
    cluster_id: Optional[int] = None
    sweep_id: Optional[str] = None
    trial_number: Optional[int] = None
    engine_id: Optional[int] = None
    host: Optional[str] = None
    device: Optional[str] = None
    created_at: float = field(default_factory=time.time)
    finished_at: Optional[float] = None
    seconds: float = 0.0
    epochs_done: int = 0  # whole epochs
    batches_done: int = 0  # of the epoch in progress (epochs_done + 1), when its last task ended mid-epoch
    epoch_batches: int = 0  # batches per epoch (0: not known yet)
    train_loss: Optional[float] = None
    val_accuracy: Optional[float] = None
    test_accuracy: Optional[float] = None
    images_per_s: Optional[float] = None
    error: Optional[str] = None


@dataclass
class EpochRecord:
    run_id: str
    epoch: int
    train_loss: float
    val_accuracy: float
    test_accuracy: float
    seconds: float
    train_seconds: float
    images_per_s: float
    lr: float
    engine_id: Optional[int] = None
    finished_at: float = field(default_factory=time.time)


def fsync_dir(folder: Path) -> None:
    """Make a rename or create in ``folder`` durable: without it a power cut can undo the rename while
    the store already names the new file, and the older file is gone too."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def _row_to(cls, row: sqlite3.Row):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: row[k] for k in row.keys() if k in names})


class Store:
    """SQLite under ``state_dir``: clusters, engines, nodes, runs, epochs, checkpoints."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # keys and connection files live below
        self.path = self.state_dir / "cluster.db"
        self.checkpoint_dir = self.state_dir / "checkpoints"
        self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, factory=_Connection)
        self.db.store_path = str(self.path)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        try:
            applied = schema.migrate(self.db)
        except schema.NewerSchemaError as error:
            self.db.close()
            raise ClusterStateError(f"{self.path}: {error}; use that version, or another state_dir") from None
        if applied:
            log.info("%s: schema brought to version %d", self.path, schema.LATEST)
        self._after_commit: Optional[list] = None  # actions waiting for the open transaction's COMMIT

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self):
        """All writes inside commit together or not at all (Ctrl-C included); nests as one."""
        if self._after_commit is not None:  # already inside one
            yield
            return
        self._after_commit = []
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            self._after_commit = None
            raise
        self.db.execute("COMMIT")
        actions, self._after_commit = self._after_commit, None
        for action in actions:
            action()

    def _when_committed(self, action) -> None:
        if self._after_commit is None:
            action()
        else:
            self._after_commit.append(action)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        """Run one statement (modules with tables of their own use this too)."""
        return self.db.execute(sql, tuple(params))

    def _insert(self, table: str, values: dict, replace: bool = False) -> sqlite3.Cursor:
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        return self.db.execute(f"{verb} INTO {table} ({columns}) VALUES ({marks})", tuple(values.values()))

    def _update(self, table: str, key: dict, values: dict) -> None:
        if not values:
            return
        sets = ", ".join(f"{k} = ?" for k in values)
        where = " AND ".join(f"{k} = ?" for k in key)
        self.db.execute(f"UPDATE {table} SET {sets} WHERE {where}", (*values.values(), *key.values()))

    # clusters ---------------------------------------------------------------
    def create_cluster(self, *, name: str, provider: str, slaves: int, threads_per_engine: int,
                       profile_dir: str, ipp_cluster_id: str, price_per_hour: float = 0.0) -> ClusterRecord:
        now = time.time()
        cursor = self._insert("clusters", dict(
            name=name, provider=provider, state="starting", slaves=slaves,
            threads_per_engine=threads_per_engine, profile_dir=profile_dir,
            ipp_cluster_id=ipp_cluster_id, created_at=now, price_per_hour=price_per_hour))
        return self.cluster(cursor.lastrowid)

    def cluster(self, cluster_id: int) -> ClusterRecord:
        row = self.db.execute("SELECT * FROM clusters WHERE id = ?", (cluster_id,)).fetchone()
        if row is None:
            raise KeyError(f"no cluster {cluster_id} in {self.path}")
        return _row_to(ClusterRecord, row)

    def active_cluster(self, name: str) -> Optional[ClusterRecord]:
        """The newest cluster of this name that is not stopped (starting, running, stopping, failed)."""
        row = self.db.execute(
            "SELECT * FROM clusters WHERE name = ? AND state != 'stopped' ORDER BY id DESC LIMIT 1", (name,)
        ).fetchone()
        return _row_to(ClusterRecord, row) if row else None

    def latest_cluster(self, name: str) -> Optional[ClusterRecord]:
        row = self.db.execute("SELECT * FROM clusters WHERE name = ? ORDER BY id DESC LIMIT 1", (name,)).fetchone()
        return _row_to(ClusterRecord, row) if row else None

    def clusters(self) -> list[ClusterRecord]:
        return [_row_to(ClusterRecord, r) for r in self.db.execute("SELECT * FROM clusters ORDER BY id")]

    def update_cluster(self, cluster_id: int, **values: Any) -> None:
        self._update("clusters", {"id": cluster_id}, values)

    def set_cluster_state(self, cluster_id: int, state: str, error: Optional[str] = None) -> None:
        values: dict[str, Any] = {"state": state}
        if state == "stopped":
            values["stopped_at"] = time.time()
        if error is not None:
            values["error"] = error
        self._update("clusters", {"id": cluster_id}, values)

    # engines and nodes --------------------------------------------------------
    def record_engines(self, cluster_id: int, engines: list[EngineRecord]) -> None:
        for engine in engines:
            self._insert("engines", {"cluster_id": cluster_id, **dataclasses.asdict(engine)}, replace=True)

    def engines(self, cluster_id: int) -> list[EngineRecord]:
        rows = self.db.execute("SELECT * FROM engines WHERE cluster_id = ? ORDER BY engine_id", (cluster_id,))
        return [_row_to(EngineRecord, r) for r in rows]

    def mark_engine_leaving(self, cluster_id: int, engine_id: int, reason: str) -> None:
        """The engine gets no new task from any master (``reason``: drain, notice, lost; "" calls it off)."""
        self._update("engines", {"cluster_id": cluster_id, "engine_id": engine_id}, {"leaving": reason or None})

    def leaving_engines(self, cluster_id: int) -> dict[int, str]:
        rows = self.db.execute("SELECT engine_id, leaving FROM engines WHERE cluster_id = ? AND leaving IS NOT NULL"
                               " AND leaving != ''", (cluster_id,))
        return {row["engine_id"]: row["leaving"] for row in rows}

    def record_node(self, cluster_id: int, node: NodeRecord) -> None:
        self._insert("nodes", {"cluster_id": cluster_id, **dataclasses.asdict(node)}, replace=True)

    def nodes(self, cluster_id: int) -> list[NodeRecord]:
        rows = self.db.execute("SELECT * FROM nodes WHERE cluster_id = ? ORDER BY launched_at, node_id", (cluster_id,))
        return [_row_to(NodeRecord, r) for r in rows]

    def update_node(self, cluster_id: int, node_id: str, **values: Any) -> None:
        self._update("nodes", {"cluster_id": cluster_id, "node_id": node_id}, values)

    # resize decisions and demand --------------------------------------------------
    def add_event(self, cluster_id: int, kind: str, detail: str) -> EventRecord:
        event = EventRecord(cluster_id=cluster_id, at=time.time(), kind=kind, detail=detail)
        self._insert("events", dataclasses.asdict(event))
        return event

    def events(self, cluster_id: int, limit: int = 20) -> list[EventRecord]:
        """The newest ``limit`` events, oldest first."""
        rows = self.db.execute("SELECT * FROM events WHERE cluster_id = ? ORDER BY id DESC LIMIT ?", (cluster_id, limit))
        return [_row_to(EventRecord, r) for r in reversed(rows.fetchall())]

    def set_demand(self, cluster_id: int, holder: str, wanted: Optional[int]) -> None:
        """How many jobs ``holder``'s scheduler could run at once now (None: it ended, forget it)."""
        if wanted is None:
            self.db.execute("DELETE FROM demand WHERE cluster_id = ? AND holder = ?", (cluster_id, holder))
        else:
            self._insert("demand", dict(cluster_id=cluster_id, holder=holder, wanted=wanted, at=time.time()),
                         replace=True)

    def demand(self, cluster_id: int, fresh_s: float) -> int:
        """Jobs wanted by every master that reported within ``fresh_s`` seconds (a killed master's row ages out)."""
        row = self.db.execute("SELECT COALESCE(SUM(wanted), 0) FROM demand WHERE cluster_id = ? AND at >= ?",
                              (cluster_id, time.time() - fresh_s)).fetchone()
        return int(row[0])

    # runs -------------------------------------------------------------------
    def create_run(self, run: RunRecord) -> RunRecord:
        values = dataclasses.asdict(run)
        values["params"] = json.dumps(run.params, sort_keys=True)
        self._insert("runs", values)
        return run

    def update_run(self, run_id: str, **values: Any) -> None:
        if "state" in values and values["state"] not in RUN_STATES:
            raise ValueError(f"run state {values['state']!r}: expected one of {RUN_STATES}")
        if "params" in values:
            values["params"] = json.dumps(values["params"], sort_keys=True)
        self._update("runs", {"id": run_id}, values)

    def run(self, run_id: str) -> Optional[RunRecord]:
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._run(row) if row else None

    def runs(self, *, sweep_id: Optional[str] = None, limit: Optional[int] = None) -> list[RunRecord]:
        sql, params = "SELECT * FROM runs", []
        if sweep_id is not None:
            sql += " WHERE sweep_id = ?"
            params.append(sweep_id)
        sql += " ORDER BY created_at DESC, id"
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        return [self._run(r) for r in self.db.execute(sql, params)]

    def _run(self, row: sqlite3.Row) -> RunRecord:
        run = _row_to(RunRecord, row)
        run.params = load_json(row["params"], f"{self.path}: the params of run {row['id']}")
        return run

    def add_epoch(self, record: EpochRecord) -> None:
        self._insert("epochs", dataclasses.asdict(record), replace=True)

    def epochs(self, run_id: str) -> list[EpochRecord]:
        rows = self.db.execute("SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,))
        return [_row_to(EpochRecord, r) for r in rows]

    def drop_epochs_after(self, run_id: str, epoch: int) -> None:
        """Forget the run's epochs after ``epoch`` (their checkpoint was lost with its engine: they are redone)."""
        self.db.execute("DELETE FROM epochs WHERE run_id = ? AND epoch > ?", (run_id, epoch))

    # checkpoints --------------------------------------------------------------
    def save_checkpoint(self, run_id: str, epoch: int, data: bytes, batches_done: int = 0) -> Path:
        """Write atomically (temp file + rename), record it, then drop older files of the run.

        ``batches_done``: a checkpoint taken that far into epoch ``epoch + 1``."""
        folder = self.checkpoint_dir / run_id
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)  # the run's folder itself survives a power cut
        digest = hashlib.sha256(data).hexdigest()
        # the position and the hash in the name: a new checkpoint never overwrites the file the row still names
        path = folder / (f"epoch-{epoch:04d}.pt" if not batches_done else
                         f"epoch-{epoch:04d}-b{batches_done:06d}-{digest[:8]}.pt")
        tmp = path.with_suffix(".pt.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)  # the rename is durable before the row names the file and the older one goes
        self._insert("checkpoints", dict(
            run_id=run_id, epoch=epoch, batches_done=batches_done, path=str(path), sha256=digest,
            bytes=len(data), created_at=time.time()), replace=True)

        def drop_older() -> None:  # only once the row naming the new file is committed
            for old in folder.glob("epoch-*.pt"):
                if old != path:
                    old.unlink(missing_ok=True)

        self._when_committed(drop_older)
        return path

    def forget_checkpoint(self, run_id: str) -> None:
        """Drop a run's checkpoint (row and files): it starts again from scratch."""
        with self.transaction():
            self.db.execute("DELETE FROM checkpoints WHERE run_id = ?", (run_id,))
            self.db.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
            self._update("runs", {"id": run_id}, {"epochs_done": 0, "batches_done": 0})

            def drop_files() -> None:
                for old in (self.checkpoint_dir / run_id).glob("epoch-*.pt*"):
                    old.unlink(missing_ok=True)

            self._when_committed(drop_files)

    def checkpoint_position(self, run_id: str) -> Optional[tuple[int, int]]:
        """(whole epochs, batches of the next epoch) where the run's stored checkpoint stands; None if none."""
        row = self.db.execute("SELECT epoch, batches_done FROM checkpoints WHERE run_id = ?", (run_id,)).fetchone()
        return (row["epoch"], row["batches_done"] or 0) if row else None

    def load_checkpoint(self, run_id: str) -> Optional[tuple[int, bytes]]:
        """(epoch, bytes) of the run's newest checkpoint, verified against its hash; None if none."""
        row = self.db.execute("SELECT * FROM checkpoints WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        try:
            data = Path(row["path"]).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {row['path']} of run {run_id} is missing") from None
        if hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise CheckpointError(f"checkpoint {row['path']} of run {run_id} is corrupt (hash mismatch)")
        return row["epoch"], data

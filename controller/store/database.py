"""The store's SQLite file: opening (and migrating) it, transactions, and the row helpers every table uses.

One ``Database`` is used from one thread. Several processes may open the same file (WAL mode, a busy
timeout), e.g. ``cluster runs`` while a sweep writes. Every write is committed before the method that
made it returns, unless it runs inside ``transaction()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

from controller.errors import ClusterStateError, DataError
from controller.store import schema

log = logging.getLogger(__name__)

# how long a write waits for another process's transaction before the store is reported busy
BUSY_TIMEOUT_S = 30.0

Record = TypeVar("Record")


class StoreBusyError(ClusterStateError):
    """Another process held the store's write lock for longer than the busy timeout."""


def load_json(text: Optional[str], where: str) -> Any:
    """A JSON column, or a DataError naming the store and the row (edited or damaged outside `cluster`)."""
    try:
        return json.loads(text)  # type: ignore[arg-type]  # None raises TypeError, reported like bad JSON
    except (TypeError, ValueError) as error:
        raise DataError(
            f"{where} is not valid JSON ({error}); the row was changed outside `cluster`: "
            f"restore the file from a backup or delete that row"
        ) from None


def row_to(cls: type[Record], row: sqlite3.Row) -> Record:
    """A record dataclass from a row; columns the dataclass does not name are left out."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # every Record is a dataclass
    return cls(**{k: row[k] for k in row.keys() if k in names})


class _Connection(sqlite3.Connection):
    """sqlite3's errors as ours: a lock held too long, a damaged file; other errors unchanged."""

    store_path = ""

    def execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:  # type: ignore[override]
        try:
            return super().execute(sql, tuple(params))
        except sqlite3.DatabaseError as error:
            raise self._ours(error) from None

    def executescript(self, script: str) -> sqlite3.Cursor:
        try:
            return super().executescript(script)
        except sqlite3.DatabaseError as error:
            raise self._ours(error) from None

    def _ours(self, error: sqlite3.DatabaseError) -> Exception:
        text = str(error)
        if "locked" in text or "busy" in text:
            return StoreBusyError(
                f"{self.store_path}: the store stayed locked by another process for {BUSY_TIMEOUT_S:.0f} s "
                f"(another `cluster` command is writing, or hung); try again when it ends"
            )
        if "malformed" in text or "not a database" in text:
            return DataError(
                f"{self.store_path}: the store is damaged ({text}); restore it from a backup "
                f"or move it away (the history is then lost)"
            )
        return error


class Database:
    """``state_dir/cluster.db``, brought to the latest schema (controller/store/schema.py) when opened."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # keys and connection files live below
        self.path = self.state_dir / "cluster.db"
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
        self._after_commit: Optional[list[Callable[[], None]]] = None  # actions waiting for the COMMIT

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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

    def when_committed(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the open transaction commits (at once outside one; never after a rollback)."""
        if self._after_commit is None:
            action()
        else:
            self._after_commit.append(action)

    def execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        """Run one statement (the tables here, and modules with tables of their own)."""
        return self.db.execute(sql, tuple(params))

    def insert(self, table: str, values: dict, replace: bool = False) -> sqlite3.Cursor:
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        return self.db.execute(f"{verb} INTO {table} ({columns}) VALUES ({marks})", tuple(values.values()))

    def update(self, table: str, key: dict, values: dict) -> None:
        if not values:
            return
        sets = ", ".join(f"{k} = ?" for k in values)
        where = " AND ".join(f"{k} = ?" for k in key)
        self.db.execute(f"UPDATE {table} SET {sets} WHERE {where}", (*values.values(), *key.values()))

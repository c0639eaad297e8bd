"""Training runs and their epochs in the store (a sweep's trials are runs with a sweep_id)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from typing import Any, Optional

from controller.store.database import Database, load_json, row_to
from controller.store.records import RUN_STATES, EpochRecord, RunRecord


class RunTable:
    """One row per training run: its parameters (JSON), state, position and latest metrics."""

    def __init__(self, db: Database):
        self.db = db

    def create(self, run: RunRecord) -> RunRecord:
        values = dataclasses.asdict(run)
        values["params"] = json.dumps(run.params, sort_keys=True)
        self.db.insert("runs", values)
        return run

    def update(self, run_id: str, **values: Any) -> None:
        if "state" in values and values["state"] not in RUN_STATES:
            raise ValueError(f"run state {values['state']!r}: expected one of {RUN_STATES}")
        if "params" in values:
            values["params"] = json.dumps(values["params"], sort_keys=True)
        self.db.update("runs", {"id": run_id}, values)

    def get(self, run_id: str) -> Optional[RunRecord]:
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._run(row) if row else None

    def all(self, *, sweep_id: Optional[str] = None, limit: Optional[int] = None) -> list[RunRecord]:
        """Newest first; only ``sweep_id``'s trials when given."""
        sql, params = "SELECT * FROM runs", list[object]()
        if sweep_id is not None:
            sql += " WHERE sweep_id = ?"
            params.append(sweep_id)
        sql += " ORDER BY created_at DESC, id"
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        return [self._run(r) for r in self.db.execute(sql, params)]

    def _run(self, row: sqlite3.Row) -> RunRecord:
        run = row_to(RunRecord, row)
        run.params = load_json(row["params"], f"{self.db.path}: the params of run {row['id']}")
        return run


class EpochTable:
    """The metrics of each whole epoch of a run."""

    def __init__(self, db: Database):
        self.db = db

    def add(self, record: EpochRecord) -> None:
        """Insert the epoch, or replace it (an epoch trained again after a rollback)."""
        self.db.insert("epochs", dataclasses.asdict(record), replace=True)

    def of(self, run_id: str) -> list[EpochRecord]:
        rows = self.db.execute("SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,))
        return [row_to(EpochRecord, r) for r in rows]

    def drop_after(self, run_id: str, epoch: int) -> None:
        """Forget the run's epochs after ``epoch`` (they are trained again)."""
        self.db.execute("DELETE FROM epochs WHERE run_id = ? AND epoch > ?", (run_id, epoch))

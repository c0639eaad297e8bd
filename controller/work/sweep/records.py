"""Sweeps in the store: one ``sweeps`` row each; trials are ``runs`` rows with a sweep_id.

Optuna's study (``sweeps.db``) holds what the sampler and pruner need; the
store holds what people read: parameters, per-epoch metrics, engine, seconds.
Results join the two: Optuna's state names, the store's metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from controller.formatting import percent
from controller.ipp import processes
from controller.store import RunRecord, Store, load_json
from controller.work.sweep.space import SearchSpace

SWEEP_STATES = ("running", "completed", "interrupted", "failed")
# Optuna's state names, ranked: finished trials first, then the rest
STATE_RANK = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}


@dataclass
class SweepRecord:
    id: str
    space: list[dict]
    sampler: str
    pruner: str
    n_trials: int
    state: str = "running"
    seed: int = 0
    overrides: dict = field(default_factory=dict)
    base_spec: dict = field(default_factory=dict)  # empty in sweeps stored before it was kept
    preset: Optional[str] = None
    cluster_id: Optional[int] = None
    master_host: Optional[str] = None
    master_pid: Optional[int] = None
    created_at: float = field(default_factory=time.time)
    finished_at: Optional[float] = None
    seconds: float = 0.0
    error: Optional[str] = None

    @property
    def search_space(self) -> SearchSpace:
        return SearchSpace.from_list(self.space)

    @property
    def master_alive(self) -> bool:
        """Whether the process that runs this sweep is still alive (only knowable on its own host)."""
        return (
            self.state == "running"
            and self.master_host == socket.gethostname()
            and self.master_pid != os.getpid()
            and processes.pid_alive(self.master_pid)
        )

    @property
    def shown_state(self) -> str:
        # a master killed outright cannot mark its sweep; a dead master's sweep is interrupted
        if self.state == "running" and not self.master_alive and self.master_pid != os.getpid():
            return "interrupted"
        return self.state


class SweepTable:
    def __init__(self, store: Store):
        self.store = store

    def create(self, record: SweepRecord) -> SweepRecord:
        values = dataclasses.asdict(record)
        values["space"] = json.dumps(record.space)
        values["overrides"] = json.dumps(record.overrides, sort_keys=True)
        values["base_spec"] = json.dumps(record.base_spec, sort_keys=True)
        self.store.insert("sweeps", values)
        return record

    def update(self, sweep_id: str, **values: Any) -> None:
        if "state" in values and values["state"] not in SWEEP_STATES:
            raise ValueError(f"sweep state {values['state']!r}: expected one of {SWEEP_STATES}")
        self.store.update("sweeps", {"id": sweep_id}, values)

    def get(self, sweep_id: str) -> Optional[SweepRecord]:
        row = self.store.execute("SELECT * FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
        return self._record(row) if row else None

    def all(self, limit: Optional[int] = None) -> list[SweepRecord]:
        sql = "SELECT * FROM sweeps ORDER BY created_at DESC"
        rows = self.store.execute(sql + (" LIMIT ?" if limit else ""), (limit,) if limit else ())
        return [self._record(r) for r in rows]

    def _record(self, row) -> SweepRecord:
        names = {f.name for f in dataclasses.fields(SweepRecord)}
        values = {k: row[k] for k in row.keys() if k in names}
        for column in ("space", "overrides", "base_spec"):
            values[column] = load_json(values[column], f"{self.store.path}: the {column} of sweep {row['id']}")
        return SweepRecord(**values)


def run_id_for(sweep_id: str, number: int) -> str:
    """Deterministic, so a trial asked just before the master died still finds its run."""
    return f"{sweep_id}-t{number:03d}"


@dataclass
class TrialResult:
    number: int
    state: str  # Optuna's: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    params: dict
    value: Optional[float]  # what Optuna was told: validation accuracy at the last epoch
    run_id: str = ""
    val_accuracy: Optional[float] = None
    test_accuracy: Optional[float] = None
    epochs_done: int = 0
    epochs_budget: int = 0
    engine_id: Optional[int] = None
    engines: list[int] = field(default_factory=list)  # every engine that ran one of its tasks
    seconds: float = 0.0  # engine seconds, summed over its tasks
    epochs: list[dict] = field(default_factory=list)  # per epoch: epoch, val/test accuracy, loss, seconds
    error: Optional[str] = None  # the traceback of a trial that raised, or why it failed
    started_at: Optional[float] = None
    finished_at: Optional[float] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SweepResult:
    sweep: SweepRecord
    trials: list[TrialResult]  # ranked: completed by validation accuracy, then pruned, running, failed
    makespan_s: float = 0.0  # wall seconds of the last run of `cluster sweep` (this process)
    dispatch_overheads: list[float] = field(default_factory=list)  # this process's tasks: submit -> start, s
    task_timings: list[tuple] = field(default_factory=list)  # (engine id, submitted, started, completed)
    engine_losses: int = 0  # tasks this process sent again because their engine died

    @property
    def sweep_id(self) -> str:
        return self.sweep.id

    @property
    def best(self) -> Optional[TrialResult]:
        return next((t for t in self.trials if t.state == "COMPLETE"), None)

    def counts(self) -> dict[str, int]:
        counts = {state: 0 for state in STATE_RANK}
        for trial in self.trials:
            counts[trial.state] = counts.get(trial.state, 0) + 1
        return counts

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self.sweep)
        record["state"] = self.sweep.shown_state
        record["space_text"] = self.sweep.search_space.describe()
        return {
            "sweep_id": self.sweep.id,
            **record,
            "counts": self.counts(),
            "trials": [t.to_dict() for t in self.trials],
            "best": self.best.to_dict() if self.best else None,
        }

    def _repr_html_(self) -> str:
        """The ranked table, for notebooks."""
        names = self.sweep.search_space.names
        head = "".join(
            f"<th>{h}</th>"
            for h in ["rank", "trial", "state", *names, "val acc", "test acc", "epochs", "engine", "seconds"]
        )
        rows = []
        for rank, t in enumerate(self.trials, 1):
            cells = [
                rank,
                t.number,
                t.state,
                *(t.params.get(n) for n in names),
                percent(t.val_accuracy),
                percent(t.test_accuracy),
                f"{t.epochs_done}/{t.epochs_budget}",
                t.engine_id,
                f"{t.seconds:.1f}",
            ]
            rows.append("<tr>" + "".join(f"<td>{'' if c is None else c}</td>" for c in cells) + "</tr>")
        best = self.best
        caption = (
            f"sweep {self.sweep.id}: best trial {best.number}, validation {percent(best.val_accuracy)}, "
            f"test {percent(best.test_accuracy)}"
            if best
            else f"sweep {self.sweep.id}: no trial completed"
        )
        return f"<table><caption>{caption}</caption><tr>{head}</tr>{''.join(rows)}</table>"


def collect(store: Store, sweep: SweepRecord, study) -> SweepResult:
    """Ranked trials of a sweep: Optuna's states and values, the store's metrics."""
    runs: dict[str, RunRecord] = {r.id: r for r in store.runs.all(sweep_id=sweep.id)}
    names = sweep.search_space.names
    trials = []
    for frozen in study.get_trials(deepcopy=False):
        run_id = run_id_for(sweep.id, frozen.number)
        run = runs.get(run_id)
        epochs = store.epochs.of(run_id) if run else []
        params = dict(frozen.params) or ({k: run.params.get(k) for k in names} if run else {})
        trials.append(
            TrialResult(
                number=frozen.number,
                state=frozen.state.name,
                params=params,
                value=frozen.value,
                run_id=run_id if run else "",
                val_accuracy=run.val_accuracy if run else None,
                test_accuracy=run.test_accuracy if run else None,
                epochs_done=run.epochs_done if run else 0,
                epochs_budget=int(run.params.get("epochs", 0)) if run else int(params.get("epochs", 0) or 0),
                engine_id=run.engine_id if run else None,
                engines=sorted({e.engine_id for e in epochs if e.engine_id is not None}),
                seconds=run.seconds if run else 0.0,
                epochs=[
                    {
                        "epoch": e.epoch,
                        "val_accuracy": e.val_accuracy,
                        "test_accuracy": e.test_accuracy,
                        "train_loss": e.train_loss,
                        "seconds": e.seconds,
                        "engine_id": e.engine_id,
                    }
                    for e in epochs
                ],
                error=frozen.user_attrs.get("error") or (run.error if run and frozen.state.name == "FAIL" else None),
                started_at=frozen.datetime_start.timestamp() if frozen.datetime_start else None,
                finished_at=frozen.datetime_complete.timestamp() if frozen.datetime_complete else None,
            )
        )
    trials.sort(
        key=lambda t: (STATE_RANK.get(t.state, 9), -(t.val_accuracy if t.val_accuracy is not None else -1.0), t.number)
    )
    return SweepResult(sweep=sweep, trials=trials)

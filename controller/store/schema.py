"""Every table of the store, as numbered migrations; ``PRAGMA user_version`` says which ones a file has.

A state_dir outlives the code that wrote it: a laptop keeps its runs and sweeps across upgrades. So a
table is never changed in place here: a change is a new migration at the end of ``MIGRATIONS``, and
``migrate`` brings any older file up to date when the store opens it (a file from a newer version is
refused rather than guessed at). Stores written before versions were kept have ``user_version`` 0 and
some of these tables already: every step is safe to apply to them (``IF NOT EXISTS``, columns added
only where missing).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Callable, Union

Step = Union[str, Callable[[sqlite3.Connection], None]]


def add_column(table: str, column: str, kind: str) -> Callable[[sqlite3.Connection], None]:
    def step(db: sqlite3.Connection) -> None:
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    step.__doc__ = f"ALTER TABLE {table} ADD COLUMN {column} {kind} (where missing)"
    return step


@dataclass(frozen=True)
class Migration:
    version: int
    why: str
    steps: tuple[Step, ...]


TABLES_V1 = """
CREATE TABLE IF NOT EXISTS clusters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    provider TEXT NOT NULL,
    state TEXT NOT NULL,            -- starting, running, stopping, stopped, failed
    slaves INTEGER NOT NULL,
    threads_per_engine INTEGER NOT NULL DEFAULT 0,
    profile_dir TEXT NOT NULL,
    ipp_cluster_id TEXT NOT NULL,
    controller_pid INTEGER,
    created_at REAL NOT NULL,
    stopped_at REAL,
    price_per_hour REAL NOT NULL DEFAULT 0,
    error TEXT
);
CREATE TABLE IF NOT EXISTS engines (
    cluster_id INTEGER NOT NULL REFERENCES clusters(id),
    engine_id INTEGER NOT NULL,
    host TEXT, pid INTEGER, device TEXT, threads INTEGER, node_id TEXT,
    registered_at REAL,
    PRIMARY KEY (cluster_id, engine_id)
);
CREATE TABLE IF NOT EXISTS nodes (
    cluster_id INTEGER NOT NULL REFERENCES clusters(id),
    node_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    host TEXT, state TEXT,
    instance_id TEXT, instance_type TEXT, zone TEXT, market TEXT,
    price_per_hour REAL DEFAULT 0,
    public_ip TEXT, private_ip TEXT, image TEXT,
    engines INTEGER DEFAULT 0,      -- engines started on this node
    launched_at REAL, terminated_at REAL,
    PRIMARY KEY (cluster_id, node_id)
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    cluster_id INTEGER REFERENCES clusters(id),
    sweep_id TEXT, trial_number INTEGER,
    params TEXT NOT NULL,           -- JSON of the RunSpec
    state TEXT NOT NULL,            -- running, completed, failed, interrupted, pruned
    engine_id INTEGER, host TEXT, device TEXT,
    created_at REAL NOT NULL, finished_at REAL,
    seconds REAL DEFAULT 0,         -- wall seconds spent on the engines, summed over tasks
    epochs_done INTEGER DEFAULT 0,
    train_loss REAL, val_accuracy REAL, test_accuracy REAL, images_per_s REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_sweep ON runs(sweep_id);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(id),
    epoch INTEGER NOT NULL,
    train_loss REAL, val_accuracy REAL, test_accuracy REAL,
    seconds REAL, train_seconds REAL, images_per_s REAL, lr REAL,
    engine_id INTEGER, finished_at REAL,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT PRIMARY KEY REFERENCES runs(id),
    epoch INTEGER NOT NULL,
    path TEXT NOT NULL, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sweeps (
    id TEXT PRIMARY KEY,
    cluster_id INTEGER,
    state TEXT NOT NULL,            -- running, completed, interrupted, failed
    space TEXT NOT NULL,            -- JSON list of ParamSpec
    sampler TEXT NOT NULL, pruner TEXT NOT NULL,
    n_trials INTEGER NOT NULL,
    seed INTEGER NOT NULL DEFAULT 0,
    overrides TEXT NOT NULL,        -- JSON of the [training] overrides every trial shares
    preset TEXT,
    master_host TEXT, master_pid INTEGER,   -- the process running it now (resume refuses a live one)
    created_at REAL NOT NULL, finished_at REAL,
    seconds REAL DEFAULT 0,         -- wall seconds the master spent running it, over all resumes
    error TEXT
);
CREATE TABLE IF NOT EXISTS bench_runs (
    id TEXT PRIMARY KEY,            -- one workload on one engine count
    bench_id TEXT NOT NULL,         -- one `cluster bench` invocation
    workload TEXT NOT NULL,
    engines INTEGER NOT NULL,
    cluster_id INTEGER,
    provider TEXT, region TEXT, zone TEXT, instance_type TEXT, gpu TEXT, image TEXT, market TEXT,
    threads INTEGER,                -- torch threads per engine
    wall_s REAL, warmup_s REAL, dispatch_s REAL, runs INTEGER, epochs INTEGER, images INTEGER,
    images_per_s REAL, epochs_per_min REAL, accuracy REAL,
    price_per_hour REAL, cost REAL,
    torch TEXT, cuda TEXT,
    params TEXT,                    -- JSON: the workload's spec (first run's)
    state TEXT NOT NULL,            -- completed, failed
    error TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS bench_runs_by_bench ON bench_runs(bench_id);
CREATE TABLE IF NOT EXISTS bench_engines (
    bench_run_id TEXT NOT NULL REFERENCES bench_runs(id),
    engine_id INTEGER NOT NULL,
    host TEXT, node_id TEXT, device TEXT, gpu TEXT, cpu TEXT, threads INTEGER,
    instance_type TEXT, zone TEXT, price_per_hour REAL,
    tasks INTEGER, epochs INTEGER, images INTEGER, train_s REAL, busy_s REAL, images_per_s REAL,
    torch TEXT, cuda TEXT,
    PRIMARY KEY (bench_run_id, engine_id)
);
CREATE TABLE IF NOT EXISTS bench_trials (
    bench_run_id TEXT NOT NULL REFERENCES bench_runs(id),
    trial INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    label TEXT, l1 REAL, lr REAL, epochs INTEGER, state TEXT,
    val_accuracy REAL, test_accuracy REAL, seconds REAL, engine_id INTEGER,
    PRIMARY KEY (bench_run_id, trial)
);
CREATE TABLE IF NOT EXISTS leases (
    kind TEXT NOT NULL,             -- run, sweep
    id TEXT NOT NULL,
    host TEXT NOT NULL, pid INTEGER NOT NULL,
    process TEXT NOT NULL,          -- boot id and start time of the holder: a reused pid is not it
    taken_at REAL NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE TABLE IF NOT EXISTS remote_engines (
    cluster_id INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    pid INTEGER NOT NULL,          -- the engine's pid (and process group) on the slave
    remote_dir TEXT NOT NULL,
    PRIMARY KEY (cluster_id, node_id, pid)
);
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1, "clusters, engines, nodes, runs, epochs, checkpoints, sweeps, bench, leases, remote engines", (TABLES_V1,)
    ),
    Migration(
        2,
        "a node keeps the address bootstrap reached it at (`cluster ssh` and stop use it)",
        (add_column("nodes", "ssh_host", "TEXT"), add_column("nodes", "ssh_port", "INTEGER")),
    ),
    Migration(
        3,
        "a sweep keeps the full spec its trials start from (resume uses it)",
        (add_column("sweeps", "base_spec", "TEXT NOT NULL DEFAULT '{}'"),),
    ),
    Migration(
        4,
        "an engine can be leaving (drained, or under a spot interruption notice)",
        (add_column("engines", "leaving", "TEXT"),),
    ),
    Migration(
        5,
        "a bench's unit per engine count is a measurement: in bench tables, `run` means a training run",
        (
            """
ALTER TABLE bench_runs RENAME TO bench_measurements;
DROP INDEX IF EXISTS bench_runs_by_bench;
CREATE INDEX IF NOT EXISTS bench_measurements_by_bench ON bench_measurements(bench_id);
ALTER TABLE bench_engines RENAME COLUMN bench_run_id TO measurement_id;
ALTER TABLE bench_trials RENAME COLUMN bench_run_id TO measurement_id;
""",
        ),
    ),
    Migration(
        6,
        "a run and its checkpoint can stand part-way into an epoch (tasks of task_seconds)",
        (
            add_column("runs", "batches_done", "INTEGER DEFAULT 0"),
            add_column("runs", "epoch_batches", "INTEGER DEFAULT 0"),
            add_column("checkpoints", "batches_done", "INTEGER DEFAULT 0"),
        ),
    ),
    Migration(
        7,
        "an elastic cluster: its target size and autoscaling knobs, the keeper's pid, when a node went "
        "idle and why it was started or released, resize decisions, the masters' demand",
        (
            add_column("clusters", "target", "INTEGER"),  # slaves to keep (`cluster scale`, the autoscaler)
            add_column("clusters", "min_slaves", "INTEGER"),
            add_column("clusters", "max_slaves", "INTEGER"),
            add_column("clusters", "idle_minutes", "REAL"),
            add_column("clusters", "replace_lost", "INTEGER"),
            add_column("clusters", "keeper_pid", "INTEGER"),
            add_column("nodes", "idle_since", "REAL"),
            add_column("nodes", "note", "TEXT"),
            """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster_id INTEGER NOT NULL REFERENCES clusters(id),
    at REAL NOT NULL,
    kind TEXT NOT NULL,             -- scale, add, remove, error
    detail TEXT NOT NULL            -- what was decided and why
);
CREATE TABLE IF NOT EXISTS demand (
    cluster_id INTEGER NOT NULL REFERENCES clusters(id),
    holder TEXT NOT NULL,           -- host:pid:n of the scheduler that reports it
    wanted INTEGER NOT NULL,        -- jobs it could run at once (running, ready and not yet started)
    at REAL NOT NULL,
    PRIMARY KEY (cluster_id, holder)
);
""",
        ),
    ),
)
LATEST = MIGRATIONS[-1].version


class NewerSchemaError(Exception):
    """The file was written by a newer version of this tool."""


def version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def migrate(db: sqlite3.Connection) -> list[int]:
    """Bring ``db`` (autocommit mode) up to ``LATEST``; returns the versions applied. Each migration
    commits with its version number or not at all; two processes opening an old file at once serialise
    on the write lock, and the second finds nothing left to do."""
    if version(db) > LATEST:
        raise NewerSchemaError(f"written by a newer version (schema {version(db)}; this version knows {LATEST})")
    applied = []
    for migration in MIGRATIONS:
        if version(db) >= migration.version:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            if version(db) >= migration.version:  # another process got there first
                db.execute("ROLLBACK")
                continue
            for step in migration.steps:
                if isinstance(step, str):
                    for statement in _statements(step):
                        db.execute(statement)
                else:
                    step(db)
            db.execute(f"PRAGMA user_version = {migration.version}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        applied.append(migration.version)
    return applied


def _statements(script: str) -> list[str]:
    """``executescript`` would COMMIT the open transaction first: split the script and run each statement."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return [s for s in statements if s]

"""Bench measurements in the store: one ``bench_measurements`` row per engine count, its engines, its trials.

A *bench* is one ``cluster bench`` invocation; it holds one *measurement* per
engine count asked for (``--engines 1,2,4``): the whole workload run on exactly
that many engines.  A *run* is always a training run (a ``runs`` row); a
measurement's trials name the runs it consisted of.  Tables beside the runs:

- ``bench_measurements``: where it ran (provider, region/zone, instance type, GPU
  or CPU model, image), engine count, wall time, images/s, epochs/min, final
  accuracy, $/hour and cost, torch/CUDA versions;
- ``bench_engines``: the same per engine (tasks, images, its share of the price);
- ``bench_trials``: the training runs it consisted of, so a report ranks the sweep
  without re-running anything.

The tables are in controller/store/schema.py; stores written before measurements had that name
(``bench_runs``, ``bench_run_id``) are renamed by its migration 5 and keep their rows.
Nothing here imports ipyparallel or torch: reports read these records only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

from controller.store import Store, load_json

# the paper's throughput: the λ sweep on 8 GPU servers, in epochs of its 50,000 training images per minute
PAPER_EPOCHS_PER_MIN = 14.59
PAPER_EPOCH_IMAGES = 50_000


@dataclass
class BenchRecord:
    """One measurement: one workload on one engine count, a row of the report's main table."""

    id: str
    bench_id: str
    workload: str
    engines: int
    provider: str
    region: str = ""
    zone: str = ""
    instance_type: str = ""
    gpu: str = ""  # the GPU's name; the CPU's model (with " (CPU)") when the engines have no GPU
    image: str = ""  # AMI or image; empty for local
    market: str = ""  # spot, on-demand, local, ssh
    threads: int = 0
    wall_s: float = 0.0  # the workload alone: from the first task sent to the last result stored
    warmup_s: float = 0.0  # loading the data on every engine first (slowest engine), not in wall_s
    dispatch_s: float = 0.0  # mean seconds from a task's submission to its start on an engine
    runs: int = 0  # training runs
    epochs: int = 0  # epochs trained, summed over runs
    images: int = 0  # images trained, summed over runs and epochs
    images_per_s: float = 0.0  # images / wall_s: the cluster's throughput, overheads included
    epochs_per_min: float = 0.0
    accuracy: Optional[float] = None  # test accuracy of the best run by validation accuracy
    price_per_hour: float = 0.0  # the used engines' share of their nodes' $/hour
    cost: float = 0.0  # price_per_hour × wall_s / 3600
    torch: str = ""
    cuda: str = ""
    params: dict = field(default_factory=dict)
    state: str = "completed"
    error: Optional[str] = None
    cluster_id: Optional[int] = None
    created_at: float = 0.0

    @property
    def paper_epochs_per_min(self) -> float:
        """Throughput in the paper's unit, 50,000-image epochs per minute, whatever --subset was used."""
        return self.images_per_s * 60 / PAPER_EPOCH_IMAGES

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["paper_epochs_per_min"] = self.paper_epochs_per_min
        return values


@dataclass
class BenchEngine:
    measurement_id: str
    engine_id: int
    host: str = ""
    node_id: str = ""
    device: str = ""
    gpu: str = ""
    cpu: str = ""
    threads: int = 0
    instance_type: str = ""
    zone: str = ""
    price_per_hour: float = 0.0
    tasks: int = 0
    epochs: int = 0
    images: int = 0
    train_s: float = 0.0
    busy_s: float = 0.0  # training and evaluating; wall_s × engines minus this is dispatch, I/O, idling
    images_per_s: float = 0.0  # while training: images / train_s
    torch: str = ""
    cuda: str = ""


@dataclass
class BenchTrial:
    measurement_id: str
    trial: int
    run_id: str  # the training run
    label: str = ""
    l1: Optional[float] = None
    lr: Optional[float] = None
    epochs: int = 0
    state: str = ""
    val_accuracy: Optional[float] = None
    test_accuracy: Optional[float] = None
    seconds: float = 0.0
    engine_id: Optional[int] = None


@dataclass
class BenchResult:
    bench_id: str
    records: list[BenchRecord]  # one measurement per engine count

    def to_dict(self) -> dict:
        return {"bench_id": self.bench_id, "records": [r.to_dict() for r in self.records]}


class BenchTable:
    """The bench tables inside the cluster's store (controller/store/schema.py)."""

    def __init__(self, store: Store):
        self.store = store

    def save(self, record: BenchRecord, engines: Sequence[BenchEngine], trials: Sequence[BenchTrial]) -> None:
        values = dataclasses.asdict(record)
        values["params"] = json.dumps(record.params, sort_keys=True)
        with self.store.transaction():
            self.store.insert("bench_measurements", values, replace=True)
            for engine in engines:
                self.store.insert("bench_engines", dataclasses.asdict(engine), replace=True)
            for trial in trials:
                self.store.insert("bench_trials", dataclasses.asdict(trial), replace=True)

    def records(self, bench_ids: Optional[Sequence[str]] = None, workload: Optional[str] = None) -> list[BenchRecord]:
        """Measurements, oldest first (then by engine count): a stable order for reports."""
        sql, params = "SELECT * FROM bench_measurements", []
        where = []
        if bench_ids:
            where.append(f"bench_id IN ({', '.join('?' for _ in bench_ids)})")
            params += list(bench_ids)
        if workload:
            where.append("workload = ?")
            params.append(workload)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at, bench_id, engines, id"
        records = []
        for row in self.store.execute(sql, params):
            values = {k: row[k] for k in row.keys()}
            values["params"] = load_json(
                values["params"] or "{}", f"{self.store.path}: the params of measurement {values.get('id')}"
            )
            records.append(BenchRecord(**values))
        return records

    def engines(self, measurement_id: str) -> list[BenchEngine]:
        rows = self.store.execute(
            "SELECT * FROM bench_engines WHERE measurement_id = ? ORDER BY engine_id", (measurement_id,)
        )
        return [BenchEngine(**{k: row[k] for k in row.keys()}) for row in rows]

    def trials(self, measurement_id: str) -> list[BenchTrial]:
        rows = self.store.execute(
            "SELECT * FROM bench_trials WHERE measurement_id = ? ORDER BY trial", (measurement_id,)
        )
        return [BenchTrial(**{k: row[k] for k in row.keys()}) for row in rows]

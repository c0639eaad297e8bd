"""`cluster bench`: a standard workload on 1..N engines of the running cluster, recorded for reports.

A *bench* is one invocation; it holds one *measurement* per engine count, and a
measurement consists of *training runs* (``runs`` rows, the only meaning of "run").

- ``workloads``: the standard workloads (the one table) and ``--engines`` counts
- ``records``:   the ``bench_measurements``, ``bench_engines`` and ``bench_trials`` tables
- ``runner``:    what ``Cluster.bench`` calls: warm-up, one measurement per engine count, cost
- ``view``:      the live view on the master

Importing the package loads the records and workloads only: no ipyparallel, no torch.
"""

from __future__ import annotations

from controller.work.bench.records import (
    PAPER_EPOCH_IMAGES,
    PAPER_EPOCHS_PER_MIN,
    BenchEngine,
    BenchRecord,
    BenchResult,
    BenchTable,
    BenchTrial,
)
from controller.work.bench.workloads import WORKLOADS, Workload, parse_engine_counts

__all__ = [
    "PAPER_EPOCH_IMAGES",
    "PAPER_EPOCHS_PER_MIN",
    "WORKLOADS",
    "BenchEngine",
    "BenchRecord",
    "BenchResult",
    "BenchTable",
    "BenchTrial",
    "Workload",
    "parse_engine_counts",
]

"""The terminal's view of a bench: a line per engine count, the training runs' own progress, a line per result."""

from __future__ import annotations

from typing import Optional

from controller.formatting import percent
from controller.work.bench.records import PAPER_EPOCHS_PER_MIN, BenchRecord
from controller.work.bench.runner import BenchSink
from controller.work.bench.workloads import Workload
from controller.work.jobs import Job
from controller.work.progress import RunProgress
from engines.spec import TaskResult


class BenchProgress(BenchSink):
    def __init__(self, console=None):
        self.runs = RunProgress(console)
        self.console = self.runs.console

    def __enter__(self) -> "BenchProgress":
        self.runs.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.runs.__exit__(*exc)

    def bench_started(self, workload: Workload, engines: list[int], runs: int) -> None:
        self.console.print(
            f"bench {workload.name} on {len(engines)} engine(s) ({', '.join(map(str, engines))}): {runs} run(s)",
            highlight=False,
        )

    def bench_finished(self, record: BenchRecord) -> None:
        self.console.print(
            f"  {record.engines} engine(s): {record.wall_s:.1f} s, {record.epochs_per_min:.2f} epochs/min "
            f"({record.paper_epochs_per_min:.2f} of 50,000 images; the paper: {PAPER_EPOCHS_PER_MIN}), "
            f"{record.images_per_s:,.0f} images/s, accuracy {percent(record.accuracy)}, ${record.cost:.4f} "
            f"at ${record.price_per_hour:.3f}/h",
            highlight=False,
        )

    # the scheduler's hooks go to the training runs' bars and epoch lines
    def task_submitted(self, job: Job) -> None:
        self.runs.task_submitted(job)

    def task_progress(self, job: Job, update: dict) -> None:
        self.runs.task_progress(job, update)

    def task_done(self, job: Job, result: TaskResult, engine_id: Optional[int]) -> None:
        self.runs.task_done(job, result, engine_id)

    def engine_lost(self, job: Job, error: BaseException) -> None:
        self.runs.engine_lost(job, error)

    def task_stalled(self, job: Job, engine_id: int, silent_s: float) -> None:
        self.runs.task_stalled(job, engine_id, silent_s)

    def job_failed(self, job: Job, error: BaseException) -> None:
        self.runs.job_failed(job, error)

"""Recording training runs in the store as their tasks come back from the engines."""

from __future__ import annotations

import logging
import time
from typing import Optional

from controller.store import EpochRecord, RunRecord, Store
from controller.work.jobs import Job, JobSource
from engines.spec import TaskResult

log = logging.getLogger(__name__)


class RunRecorder:
    """Stores each task's epochs and checkpoint, and keeps the run's row up to date."""

    def __init__(self, store: Store):
        self.store = store

    def record_result(self, job: Job, result: TaskResult, engine_id: Optional[int]) -> RunRecord:
        # one transaction: a Ctrl-C never leaves epochs without their checkpoint, or seconds counted twice
        with self.store.transaction():
            return self._record_result(job, result, engine_id)

    def _record_result(self, job: Job, result: TaskResult, engine_id: Optional[int]) -> RunRecord:
        run = self.store.runs.get(job.run_id)
        assert run is not None, f"run {job.run_id} is stored before its first task"
        if not result.batches_run and not result.shipped:
            return run  # the task trained nothing and brought nothing back (its engine is going away)
        seconds = run.seconds or 0.0
        for epoch in result.epochs:
            self.store.epochs.add(EpochRecord(run_id=job.run_id, engine_id=engine_id, **epoch))
            seconds += epoch["seconds"]
        if result.checkpoint is not None and self.store.checkpoints.position(job.run_id) != result.position:
            self.store.checkpoints.save(job.run_id, result.completed_epochs, result.checkpoint, result.batches_done)
        values = dict(
            epochs_done=result.completed_epochs,
            batches_done=result.batches_done,
            seconds=seconds,
            engine_id=engine_id,
            host=result.host,
            device=result.device,
        )
        if result.epoch_batches:
            values["epoch_batches"] = result.epoch_batches
        if result.epochs:
            last = result.epochs[-1]
            values.update(
                train_loss=last["train_loss"],
                val_accuracy=last["val_accuracy"],
                test_accuracy=last["test_accuracy"],
                images_per_s=self._mean_rate(job.run_id),
            )
        if result.diverged:
            values.update(
                state="failed",
                finished_at=time.time(),
                error="training diverged (loss is NaN or infinite); lower the learning rate",
            )
        elif result.completed_epochs >= job.spec["epochs"]:
            values.update(state="completed", finished_at=time.time())
        self.store.runs.update(job.run_id, **values)
        return self.store.runs.get(job.run_id) or run

    def roll_back(self, run_id: str, position: tuple[int, int]) -> None:
        """The run goes on from its stored checkpoint at ``position`` (epochs, batches): the epochs after it,
        recorded while a newer checkpoint was kept on an engine that is now gone, are forgotten and redone."""
        epochs, batches = position
        with self.store.transaction():
            self.store.epochs.drop_after(run_id, epochs)
            kept = self.store.epochs.of(run_id)
            last = kept[-1] if kept else None
            self.store.runs.update(
                run_id,
                epochs_done=epochs,
                batches_done=batches,
                seconds=sum(e.seconds for e in kept),
                train_loss=last.train_loss if last else None,
                val_accuracy=last.val_accuracy if last else None,
                test_accuracy=last.test_accuracy if last else None,
                images_per_s=self._mean_rate(run_id) if last else None,
            )

    def resume_from_checkpoint(self, run_id: str) -> tuple[int, int]:
        """Where a run resumes: its stored checkpoint's position, with the run's row rolled back to it."""
        position = self.store.checkpoints.position(run_id) or (0, 0)
        self.roll_back(run_id, position)
        return position

    def start_over(self, run_id: str) -> None:
        """The run trains again from scratch: its checkpoint and epochs are forgotten, its position reset."""
        with self.store.transaction():
            self.store.checkpoints.forget(run_id)
            self.store.epochs.drop_after(run_id, 0)
            self.store.runs.update(run_id, epochs_done=0, batches_done=0)

    def mark_interrupted(self, run_ids) -> None:
        """Runs still running when their master stopped driving them (Ctrl-C, a lost cluster, a bug) stay
        resumable from their last checkpoint; runs that already ended keep their state."""
        for run_id in run_ids:
            run = self.store.runs.get(run_id)
            if run is not None and run.state == "running":
                self.store.runs.update(run_id, state="interrupted", finished_at=time.time())

    def record_failure(self, job: Job, traceback: str, state: str = "failed") -> None:
        self.store.runs.update(job.run_id, state=state, error=traceback, finished_at=time.time())

    def _mean_rate(self, run_id: str) -> float:
        epochs = self.store.epochs.of(run_id)
        seconds = sum(e.train_seconds for e in epochs)
        images = sum(e.images_per_s * e.train_seconds for e in epochs)
        return images / seconds if seconds else 0.0


class SingleRun(JobSource):
    """The JobSource of ``cluster train``: one job, stored as it goes."""

    def __init__(self, store: Store, job: Job):
        self.recorder = RunRecorder(store)
        self.job: Optional[Job] = job
        self.error: Optional[BaseException] = None
        self.traceback = ""

    def next_job(self) -> Optional[Job]:
        job, self.job = self.job, None
        return job

    def on_result(self, job: Job, result: TaskResult, engine_id: Optional[int]) -> bool:
        self.recorder.record_result(job, result, engine_id)
        return True

    def on_rollback(self, job: Job) -> None:
        self.recorder.roll_back(job.run_id, job.shipped)

    def on_error(self, job: Job, error: BaseException, traceback: str) -> None:
        self.error, self.traceback = error, traceback
        self.recorder.record_failure(job, traceback)

    def exhausted(self) -> bool:
        return self.job is None

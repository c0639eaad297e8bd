"""The JobSource of a sweep: Optuna asks for trials, hears each epoch, prunes or lets them go on.

Every trial is one job (one ``runs`` row) that the scheduler runs as a chain of
one-epoch tasks.  After each task the source stores the epoch, reports the
validation accuracy to Optuna and asks the pruner; the job goes on only if the
trial is neither pruned nor finished.  A trial that raises is told FAIL with
its traceback kept; the sweep goes on.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import optuna
from optuna.trial import TrialState

from controller.config import TASK_KEYS
from controller.store import CheckpointError, RunRecord, Store
from controller.work.jobs import Job, JobSource
from controller.work.recorder import RunRecorder
from controller.work.sweep.records import run_id_for
from controller.work.sweep.space import SearchSpace
from engines.spec import TaskResult, stored_params

log = logging.getLogger(__name__)


class SweepListener(Protocol):
    def trial_finished(
        self, number: int, state: str, value: Optional[float], params: dict, error: Optional[str]
    ) -> None: ...


@dataclass
class Tally:
    """What the live view shows: trials by state and the best so far."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: dict[int, Job] = field(default_factory=dict)  # trial number -> its job
    best_number: Optional[int] = None
    best_value: Optional[float] = None
    best_params: dict = field(default_factory=dict)

    def finished(self, number: int, state: TrialState, value: Optional[float], params: dict) -> None:
        self.running.pop(number, None)
        if state == TrialState.COMPLETE:
            self.complete += 1
            if value is not None and (self.best_value is None or value > self.best_value):
                self.best_number, self.best_value, self.best_params = number, value, dict(params)
        elif state == TrialState.PRUNED:
            self.pruned += 1
        else:
            self.failed += 1


class SweepSource(JobSource):
    """Asks Optuna for up to ``n_trials`` trials in all (resumed ones included) and tells it everything."""

    def __init__(
        self,
        study: optuna.Study,
        store: Store,
        sweep_id: str,
        space: SearchSpace,
        base_spec: dict,
        n_trials: int,
        cluster_id: Optional[int] = None,
        resumed: Optional[list[Job]] = None,
        task: Optional[Callable[..., dict]] = None,
    ):
        self.study = study
        self.store = store
        self.recorder = RunRecorder(store)
        self.sweep_id = sweep_id
        self.space = space
        self.base_spec = base_spec
        self.n_trials = n_trials
        self.cluster_id = cluster_id
        self.task = task
        self.pending: collections.deque[Job] = collections.deque(resumed or [])
        self.asked = len(study.get_trials(deepcopy=False))
        self.tally = Tally()
        self.listener: Optional[SweepListener] = None
        for frozen in study.get_trials(deepcopy=False):
            if frozen.state.is_finished():
                self.tally.finished(frozen.number, frozen.state, frozen.value, frozen.params)
        for job in self.pending:
            self.tally.running[job.tag.number] = job

    # JobSource ------------------------------------------------------------------
    def next_job(self) -> Optional[Job]:
        if self.pending:
            return self.pending.popleft()
        if self.asked >= self.n_trials:
            return None
        trial = self.study.ask()
        self.asked += 1
        job = job_for(trial, self.store, self.sweep_id, self.space, self.base_spec, self.cluster_id)
        if self.task is not None:
            job.task = self.task
        self.tally.running[trial.number] = job
        return job

    def on_result(self, job: Job, result: TaskResult, engine_id: Optional[int]) -> bool:
        trial: optuna.Trial = job.tag
        run = self.recorder.record_result(job, result, engine_id)
        # whole epochs only: a task that ended mid-epoch reports nothing, so the pruner never sees a part
        for epoch in result.epochs:
            trial.report(epoch["val_accuracy"], epoch["epoch"])
        if result.epochs and trial.should_prune():
            self.finish(job, TrialState.PRUNED, run)
            return False
        if result.diverged:
            # loss is NaN or infinite: no later epoch can recover, whatever the pruner thinks
            self.finish(job, TrialState.FAIL, run, error=run.error)
            return False
        if job.finished:
            self.finish(job, TrialState.COMPLETE, run)
            return False
        return True

    def on_rollback(self, job: Job) -> None:
        # Optuna keeps the values of the epochs that are redone; redone on the same device they are equal
        self.recorder.roll_back(job.run_id, job.shipped)

    def on_error(self, job: Job, error: BaseException, traceback: str) -> None:
        self.recorder.record_failure(job, traceback)
        self.finish(job, TrialState.FAIL, self.store.runs.get(job.run_id), error=traceback)

    def exhausted(self) -> bool:
        return not self.pending and self.asked >= self.n_trials

    def jobs_left(self) -> int:
        """Trials not started yet (resumed ones waiting, and those not asked for): the demand beyond the running."""
        return len(self.pending) + max(0, self.n_trials - self.asked)

    # -----------------------------------------------------------------------------
    def finish(self, job: Job, state: TrialState, run: Optional[RunRecord], error: Optional[str] = None) -> None:
        trial: optuna.Trial = job.tag
        if error:
            trial.set_user_attr("error", error[-20_000:])  # Optuna caps attribute size; the store keeps all
        value = run.val_accuracy if run is not None else None
        if state == TrialState.PRUNED:  # stored first: a master dying in between leaves a trial to resume,
            # never one Optuna calls pruned while the store says it still runs
            self.store.runs.update(job.run_id, state="pruned", finished_at=time.time())
        if state == TrialState.COMPLETE:
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=state)
        self.tally.finished(trial.number, state, value, trial.params)
        if self.listener is not None:
            self.listener.trial_finished(trial.number, state.name, value, trial.params, error)


def job_for(
    trial: optuna.Trial, store: Store, sweep_id: str, space: SearchSpace, base_spec: dict, cluster_id: Optional[int]
) -> Job:
    """The job of a trial, from its last stored checkpoint; its runs row is created when missing."""
    params = space.suggest(trial)  # a resumed trial gets its own values back
    run_id = run_id_for(sweep_id, trial.number)
    run = store.runs.get(run_id)
    if run is None:
        spec: dict[str, Any] = {**base_spec, **params, "run_id": run_id}
        store.runs.create(
            RunRecord(id=run_id, params=spec, cluster_id=cluster_id, sweep_id=sweep_id, trial_number=trial.number)
        )
        return Job(run_id=run_id, spec=spec, tag=trial)
    try:
        stored = store.checkpoints.load(run_id)
    except CheckpointError as error:  # one trial's lost file must not end the whole sweep: train it again
        log.warning("%s; trial %d starts again from scratch", error, trial.number)
        RunRecorder(store).start_over(run_id)
        stored = None
    checkpoint = stored[1] if stored else None
    position = store.checkpoints.position(run_id) or (0, 0)
    # how the sweep cuts runs into tasks comes from its base spec (the current configuration)
    spec = {**stored_params(run.params), **{k: base_spec[k] for k in TASK_KEYS if k in base_spec}}
    job = Job(
        run_id=run_id,
        spec=spec,
        checkpoint=checkpoint,
        epochs_done=position[0],
        batches_done=position[1],
        shipped=position,
        tag=trial,
    )
    if not job.finished:  # a finished run (the master died before telling Optuna) keeps its row as it is
        # epochs stored after the last checkpoint (the master died between the two, or the newest checkpoint
        # was kept on an engine) are trained again
        RunRecorder(store).roll_back(run_id, position)
        store.runs.update(run_id, state="running", error=None, finished_at=None, cluster_id=cluster_id)
    return job

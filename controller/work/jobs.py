"""The job protocol: what a scheduler runs, where its jobs come from, who watches, who says which engines
may work. No ipyparallel here: sweeps, benches, the run recorder and the live views name these types
without loading the scheduler.

A *job* is one training run (a single ``cluster train``, or one trial of a sweep), sent to the engines as
a chain of short tasks; a :class:`JobSource` hands out jobs and takes their results; a
:class:`ProgressSink` hears what happens to them; an :class:`EngineRoster` says which engines get no
new task. Optional members are declared with defaults that do nothing.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Optional

from engines.spec import TaskResult
from engines.tasks import train_task

# how often a scheduler reads the roster: a drained engine gets no new task after at most this long
ROSTER_CHECK_S = 1.0


@dataclass
class Job:
    run_id: str
    spec: dict  # RunSpec as a dict
    checkpoint: Optional[bytes] = None  # the newest checkpoint the master holds (shipped)
    epochs_done: int = 0  # whole epochs
    epochs_per_task: int = 1
    engine_losses: int = 0
    tag: Any = None  # the source's own handle (an Optuna trial, ...)
    # the engine function: (spec, checkpoint, n_epochs) -> TaskResult dict (engines.loop.TaskResult)
    task: Callable[..., dict] = train_task
    batches_done: int = 0  # of epoch epochs_done + 1: the run stands mid-epoch
    shipped: tuple[int, int] = (0, 0)  # (epochs, batches) where ``checkpoint`` stands
    held_on: Optional[int] = None  # the engine keeping a newer checkpoint than ``checkpoint``
    moved: bool = False  # its last task was lost or handed back by a leaving engine: it goes first

    @property
    def finished(self) -> bool:
        return self.epochs_done >= self.spec["epochs"]

    @property
    def position(self) -> tuple[int, int]:
        return self.epochs_done, self.batches_done

    def roll_back(self) -> None:
        """The engine holding the newest checkpoint is gone: go on from the last shipped one."""
        self.held_on = None
        self.epochs_done, self.batches_done = self.shipped


class JobSource(abc.ABC):
    """Where a scheduler's jobs come from and where their results go (a single run, a sweep, a bench).
    Subclasses implement the first five; ``jobs_left`` is optional."""

    @abc.abstractmethod
    def next_job(self) -> Optional[Job]:
        """A new job to start now, or None when there is none at the moment."""

    @abc.abstractmethod
    def on_result(self, job: Job, result: TaskResult, engine_id: Optional[int]) -> bool:
        """Store a task's result; True when the job should go on (more epochs)."""

    @abc.abstractmethod
    def on_rollback(self, job: Job) -> None:
        """The job went back to its last shipped checkpoint (``job.shipped``): forget the progress after it."""

    @abc.abstractmethod
    def on_error(self, job: Job, error: BaseException, traceback: str) -> None:
        """The task raised (not an engine loss): record the failure; the job ends."""

    @abc.abstractmethod
    def exhausted(self) -> bool:
        """True when ``next_job`` will never return a job again."""

    def jobs_left(self) -> int:
        """The jobs ``next_job`` will still return (a sweep's trials not yet started); the scheduler adds it to
        the demand it reports for autoscaling. None known: 0."""
        return 0


class ProgressSink:
    """What the scheduler tells a display; every hook is optional (a no-op here)."""

    def task_submitted(self, job: Job) -> None: ...

    def task_started(self, job: Job, engine_id: int) -> None:
        """The task began on that engine (heard within the scheduler's poll interval)."""

    def task_withdrawn(self, job: Job) -> None:
        """A queued task was withdrawn to let a moved job go first; the job is sent again."""

    def task_progress(self, job: Job, update: dict) -> None: ...

    def task_done(self, job: Job, result: TaskResult, engine_id: Optional[int]) -> None: ...

    def engine_lost(self, job: Job, error: BaseException) -> None: ...

    def task_stalled(self, job: Job, engine_id: int, silent_s: float) -> None:
        """The task reported no progress for ``silent_s``: its engine is being killed (``engine_lost`` follows)."""

    def job_failed(self, job: Job, error: BaseException) -> None: ...

    def tick(self) -> None:
        """Once per scheduler loop (about every ``poll_s``), whether or not anything is in flight."""


class EngineRoster(abc.ABC):
    """Which engines must get no new task: shared by every master through the store (controller/api.py)."""

    @abc.abstractmethod
    def leaving(self) -> set[int]:
        """Engines being drained (``cluster scale``/``remove``) or under a spot interruption notice."""

    @abc.abstractmethod
    def engine_leaving(self, engine_id: int, reason: str) -> None:
        """A task came back early because its engine is going (reason: engines.process.stopping DRAIN or NOTICE)."""

    def ready(self) -> Optional[set[int]]:
        """The engines that have reported themselves (imported torch and the training code: they are recorded
        then); only these get tasks, so that a task, above all one moved from a lost engine, does not wait on
        a just-started engine's imports. None: every registered engine is ready."""
        return None

    def report_demand(self, wanted: Optional[int]) -> None:
        """How many jobs the scheduler could run at once (None: it ended); the keeper turns slaves on for
        them (controller/cluster/keeper.py). Not reported: nothing to do."""

"""Tasks onto engines: every run is a chain of short tasks, load-balanced over all engines.

A *job* is one training run (a single ``cluster train``, or one trial of a
sweep).  The scheduler keeps every engine busy with one task each, takes the
next job from a :class:`JobSource` as soon as an engine is free, and after each
task hands the result to the source, which stores it and says whether the job
goes on (Optuna's pruning lives there, not here).  A task lost with its engine
is sent again, from the job's last checkpoint, to another engine, ahead of every other job: when no
engine is free it takes the place of a task still queued in ipyparallel's task scheduler, which is
withdrawn (aborted) and sent again right after it (:class:`ReadyJobs`).

A task may end mid-epoch (``task_seconds``, a drain, a spot notice): its checkpoint stands there and the
next task goes on from it.  With ``checkpoint_minutes`` the engine keeps the newest checkpoint instead of
shipping it (engines/held.py): the job's next task goes to that engine alone, with a reference in place
of the bytes; if that engine is lost, the job goes back to its last shipped checkpoint (``on_rollback``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import ipyparallel as ipp

from controller.work.jobs import ROSTER_CHECK_S, EngineRoster, Job, JobSource, ProgressSink
from controller.work.watch import (
    STALL_KILLS,
    Watchdog,
    discount_pause,
    is_engine_loss,
    kill_through_nanny,
    remote_error_name,
    running_on,
    task_metadata,
)
from engines.held import reference as held_reference
from engines.spec import ENGINE_GOING, TaskResult

log = logging.getLogger(__name__)

# a job whose task is lost with its engine three times in a row (no task of it trained in between) fails: a
# task that kills every engine it runs on (out of memory, a crash) is the task's fault, not bad luck
MAX_ENGINE_LOSSES = 3
# ipyparallel's AsyncResults sit in reference cycles with their own callbacks, so a finished one, with the
# checkpoint it carries, is freed only by a full garbage collection, which Python runs rarely: one every
# 32 MB of results keeps the master flat at a cost of ~0.1 s per 32 tasks of the paper's CNN
RESULT_BYTES_PER_COLLECTION = 32 * 1024 * 1024


@dataclass
class _InFlight:
    job: Job
    result: ipp.AsyncResult
    last_update: Optional[dict] = None
    started_on: Optional[int] = None  # the engine it runs on, once heard
    heard_at: float = 0.0  # when it began, last reported progress, or its engine was last told to die
    kills: int = 0  # SIGKILLs sent to its engine for its silence
    moved: bool = False  # the task of a moved job (ReadyJobs): never withdrawn for another
    withdrawn: bool = False  # aborted while queued: its job goes again once the abort comes back

    @property
    def queued(self) -> bool:
        """Not yet begun on an engine, as far as the master knows: it can still be withdrawn."""
        return self.started_on is None and running_on(self.result) is None


@dataclass
class ReadyJobs:
    """Jobs waiting to be sent, in the order they go.

    ``moved`` jobs, whose task was lost with its engine or handed back by an engine that is leaving
    (drain, spot notice), go first, oldest first: their runs stand still meanwhile, and a user wants
    interrupted work resumed before new work starts.  ``next`` holds the rest: a finished task's
    follow-up keeps the chain on the freed engine's turn, and a withdrawn task goes again where it was.
    """

    moved: collections.deque = field(default_factory=collections.deque)
    next: collections.deque = field(default_factory=collections.deque)

    def __len__(self) -> int:
        return len(self.moved) + len(self.next)

    def push(self, job: Job) -> None:
        if job.moved:
            self.moved.append(job)
        else:
            self.next.appendleft(job)  # a follow-up keeps the chain on the freed engine's turn

    def pop(self) -> Optional[Job]:
        if self.moved:
            return self.moved.popleft()
        return self.next.popleft() if self.next else None


@dataclass
class SchedulerStats:
    tasks: int = 0
    engine_losses: int = 0
    withdrawn: int = 0  # queued tasks aborted so that a moved job went first
    withdrawn_late: int = 0  # of those, tasks that had begun when the abort arrived (they ran as usual)
    stalls: int = 0  # engines killed because their task reported no progress for stall_s
    dispatch_overheads: list[float] = field(default_factory=list)  # engine-idle seconds per task
    # per finished task: engine id and the epoch seconds of submit, start (on the engine), completion
    timings: list[tuple[Optional[int], float, float, float]] = field(default_factory=list)


# a task sent to the engine holding its run's checkpoint failed because that engine no longer has it: it
# dropped the checkpoint (engines.held), or it unregistered before the task reached it
HELD_LOST = ("CheckpointNotHeld", "ImpossibleDependency")
# a queued task whose view named only engines that are gone since: ipyparallel's task scheduler fails it as
# impossible; it never began, so it goes again (on a view of the engines left) without counting as a loss
TARGETS_GONE = "ImpossibleDependency"


class Scheduler:
    def __init__(
        self,
        client: ipp.Client,
        poll_s: float = 0.2,
        targets: Optional[list[int]] = None,
        prefetch: int = 0,
        watchdog: Optional[Watchdog] = None,
        roster: Optional[EngineRoster] = None,
        clock: Callable[[], float] = time.monotonic,
        stall_s: float = 0.0,
    ):
        self.client = client
        self.clock = clock
        # a task that began and then reports no progress for stall_s (0: never) has its engine killed: a hung
        # CUDA kernel or NCCL call keeps the engine's heartbeat thread alive, so nothing else would notice
        self.stall_s = stall_s
        self._listened_at: Optional[float] = None  # the last time this scheduler looked at its tasks
        self.watchdog = watchdog
        self.roster = roster
        self._excluded: set[int] = set()  # engines that get no new task (draining, spot notice, hung)
        self._hung: set[int] = set()  # engines that outlived STALL_KILLS kills: excluded for good
        self._ready: Optional[set[int]] = None  # engines warm enough for a task; None: every engine
        self._roster_checked = float("-inf")
        # prefetch: tasks queued beyond one per engine; ipyparallel's scheduler (hwm=1) holds them until an
        # engine frees up, so engines start the next task while the master still books the last one
        self.prefetch = prefetch
        # targets: only these engine ids (a benchmark on 1 of 4 engines); None = every engine
        self.targets = list(targets) if targets else None
        self.view = client.load_balanced_view(self.targets)
        self._view_targets: Optional[list[int]] = self.targets
        self.poll_s = poll_s
        self.stats = SchedulerStats()
        # finished tasks whose dispatch overhead is not yet counted: engine id and metadata (not the result,
        # which holds a checkpoint: memory stays flat however many tasks a sweep runs)
        self._timed: list[tuple[Optional[int], dict]] = []
        self._result_bytes_since_collection = 0

    def usable_engines(self) -> list[int]:
        """Registered engines that may get a task: the chosen targets (all when none), less the leaving."""
        registered = self.client.ids
        base = [engine for engine in self.targets if engine in registered] if self.targets else registered
        return [
            engine for engine in base if engine not in self._excluded and (self._ready is None or engine in self._ready)
        ]

    def capacity(self) -> int:
        usable = len(self.usable_engines())
        registered = set(self.client.ids)
        if not usable and (self.targets or self._excluded & registered or self._ready is not None and registered):
            # every engine is leaving or still starting, or every chosen one is gone: hold the work until one
            # is usable (the watchdog gives up after engine_timeout)
            return 0
        return max(1, usable) + self.prefetch

    def exclude(self, engine_id: int, reason: str) -> None:
        """No new task for this engine (its running task, if any, comes back by itself)."""
        if engine_id not in self._excluded:
            log.info("engine %s gets no new task (%s)", engine_id, reason)
            self._excluded.add(engine_id)
            self._retarget()

    def _refresh_roster(self, wanted: Optional[int] = None) -> None:
        now = self.clock()
        if self.roster is None or now - self._roster_checked < ROSTER_CHECK_S:
            return
        self._roster_checked = now
        self._excluded = set(self.roster.leaving()) | self._hung
        ready = self.roster.ready()
        self._ready = set(ready) if ready is not None else None
        self._retarget()
        if wanted is not None:
            self.roster.report_demand(wanted)

    def _retarget(self) -> None:
        """Point the load-balanced view at the usable engines.  With nothing excluded, no chosen targets and no
        roster saying which engines are ready it names none, so that engines joining later (``cluster scale``)
        get tasks at once; with such a roster they get tasks once ready (within ROSTER_CHECK_S)."""
        gated = self._excluded or self.targets or self._ready is not None
        wanted = sorted(self.usable_engines()) if gated else None
        if wanted == [] and not self.targets:
            wanted = None  # the leaving engines are all gone too: any engine that joins may take the work
        if wanted != self._view_targets and (wanted is None or wanted):
            self._view_targets = wanted
            self.view = self.client.load_balanced_view(wanted)

    def submit(self, job: Job) -> _InFlight:
        if self._view_targets is not None and not set(self._view_targets) <= set(self.client.ids):
            self._retarget()  # an engine the view names died since: ipyparallel refuses to address it
        view = self.view
        sent: bytes | dict | None = job.checkpoint
        if job.held_on is not None:  # only that engine has the newest checkpoint: the task goes there
            view = self.client.load_balanced_view([job.held_on])
            sent = held_reference(job.run_id, job.epochs_done, job.batches_done)
        result = view.apply_async(job.task, job.spec, sent, job.epochs_per_task)
        self.stats.tasks += 1
        return _InFlight(job, result)

    def _roll_back(self, job: Job, source: JobSource, why: object) -> None:
        log.warning(
            "run %s: engine %s held its checkpoint at epoch %d batch %d and is gone (%s); going on "
            "from the last shipped one (epoch %d batch %d)",
            job.run_id,
            job.held_on,
            job.epochs_done,
            job.batches_done,
            why,
            *job.shipped,
        )
        job.roll_back()
        source.on_rollback(job)

    def run(self, source: JobSource, sink: Optional[ProgressSink] = None) -> SchedulerStats:
        sink = sink or ProgressSink()
        ready = ReadyJobs()
        in_flight: dict[str, _InFlight] = {}
        self._refresh_roster()
        try:
            while True:
                self._fill(source, sink, ready, in_flight)
                if not in_flight:
                    if not ready and source.exhausted():
                        self._count_overheads()
                        return self.stats
                    time.sleep(self.poll_s)  # the source has nothing now, or no engine is usable, but may later
                    sink.tick()
                    self._watch(self._wanted(source, in_flight, ready))
                    continue
                done, _ = concurrent.futures.wait(
                    [t.result for t in in_flight.values()],
                    timeout=self.poll_s,
                    return_when=concurrent.futures.FIRST_COMPLETED,
                )
                registered = set(self.client.ids)
                # one reading of the clock for the whole pass: a pause of the master that falls within it is
                # then discounted from every task's silence, wherever in the pass it fell
                now = self.clock()
                self._discount_pause(in_flight, now)
                for task in list(in_flight.values()):
                    if task.result in done:
                        del in_flight[task.result.msg_ids[0]]
                        if self._withdrawal_confirmed(task):
                            ready.next.appendleft(task.job)  # it was next in line: it goes next again
                            continue
                        follow_up = self._finish(task, source, sink)
                    elif running_on(task.result) not in registered | {None}:
                        # the hub dropped its engine: ipyparallel's task scheduler fails such a task only
                        # 5 s later (in case its result is still on the way); it goes elsewhere now
                        del in_flight[task.result.msg_ids[0]]
                        gone = ipp.error.EngineError(
                            f"engine {running_on(task.result)} is gone (unregistered while running the task)"
                        )
                        follow_up = self._lost(task.job, gone, source, sink)
                    else:
                        self._note_start(task, sink, now)
                        self._report_progress(task, sink, now)
                        if not self._check_stall(task, sink, now):
                            continue
                        del in_flight[task.result.msg_ids[0]]
                        follow_up = self._give_up_on_hung_engine(task, source, sink)
                    if follow_up is not None:
                        ready.push(follow_up)
                sink.tick()
                self._watch(self._wanted(source, in_flight, ready))
        except BaseException:
            # Ctrl-C or a bug: queued tasks are withdrawn; tasks already running finish on
            # their engines and are ignored (their runs resume from the last stored checkpoint)
            pending = [t.result for t in in_flight.values() if not t.result.done()]
            if pending:
                try:
                    self.client.abort(pending)
                except Exception:  # the controller may be gone as well
                    log.debug("abort of %d pending tasks failed", len(pending), exc_info=True)
            raise
        finally:
            if self.roster is not None:
                try:
                    self.roster.report_demand(None)
                except Exception:  # noqa: BLE001 - the store may be what failed; the row ages out anyway
                    log.debug("could not withdraw the demand report", exc_info=True)

    def _fill(self, source: JobSource, sink: ProgressSink, ready: ReadyJobs, in_flight: dict[str, _InFlight]) -> None:
        """Send jobs while there is room: moved jobs first, then follow-ups and withdrawn ones, then new
        jobs.  A moved job finding no room takes a queued task's place (see :meth:`_withdraw_one`)."""
        while True:
            active = sum(1 for task in in_flight.values() if not task.withdrawn)
            capacity = self.capacity()
            # no capacity at all (every engine leaving): nothing can start, so nothing is withdrawn either
            if active >= capacity and not (capacity and ready.moved and self._withdraw_one(in_flight, sink)):
                return
            job = ready.pop() or source.next_job()
            if job is None:
                return
            if job.held_on is not None and job.held_on not in self.client.ids:
                self._roll_back(job, source, "unregistered")
            task = self.submit(job)
            task.moved, job.moved = job.moved, False
            in_flight[task.result.msg_ids[0]] = task
            sink.task_submitted(job)

    def _withdraw_one(self, in_flight: dict[str, _InFlight], sink: ProgressSink) -> bool:
        """Abort the newest task that no engine has begun, so that a moved job is sent in its place.

        ipyparallel queues a load-balanced task in its task scheduler until an engine is free (hwm 1); an
        abort asks every engine to refuse it, so the first engine that frees up hands it straight back
        (a round trip of milliseconds) and takes the moved job, queued behind it, instead.  The withdrawn
        job loses nothing (it had not begun) and goes again as soon as its abort comes back.  When the
        abort comes too late (an engine had just begun it), that task runs and is booked as usual.
        """
        queued = [task for task in in_flight.values() if not task.withdrawn and not task.moved and task.queued]
        if not queued:
            return False
        task = queued[-1]  # the newest: the one that would have waited longest anyway
        try:
            self.client.abort([task.result], block=False)
        except Exception:  # noqa: BLE001 - an engine unregistering meanwhile: the moved job just waits
            log.debug("could not withdraw task %s", task.result.msg_ids, exc_info=True)
            return False
        task.withdrawn = True
        self.stats.withdrawn += 1
        log.info("run %s: queued task withdrawn so that a moved run goes first", task.job.run_id)
        sink.task_withdrawn(task.job)
        return True

    def _withdrawal_confirmed(self, task: _InFlight) -> bool:
        """A withdrawn task came back aborted (True), or ran after all because the abort came too late."""
        if not task.withdrawn:
            return False
        try:
            task.result.get(0)
        except ipp.error.TaskAborted:
            self._forget(task.result, 0)
            return True
        except BaseException:  # noqa: BLE001 - it began and failed: _finish sorts it as any other failure
            return False
        self.stats.withdrawn_late += 1
        return False

    def _note_start(self, task: _InFlight, sink: ProgressSink, now: float) -> None:
        if task.started_on is None:
            engine = running_on(task.result)
            if engine is not None:
                task.started_on = engine
                task.heard_at = now
                sink.task_started(task.job, engine)

    def _discount_pause(self, in_flight: dict[str, _InFlight], now: float) -> None:
        """Silence counts only while the master listens: after a pause of the master (a frozen or sleeping
        process; the client's thread then still has the engines' progress to read), every task's silence
        starts again, so that no engine is killed for what the master did not hear."""
        if self.stall_s:
            self._listened_at = discount_pause(in_flight.values(), self._listened_at, now)

    def _check_stall(self, task: _InFlight, sink: ProgressSink, now: float) -> bool:
        """Kill the engine of a task silent for ``stall_s`` (through its nanny, which answers while the engine
        is stuck). The hub then drops the engine and the task goes on elsewhere as after any lost engine, from
        its checkpoint; a task that stalls engine after engine fails its run after MAX_ENGINE_LOSSES.
        True when the engine outlived STALL_KILLS kills: the caller gives the task up on it."""
        if not self.stall_s or task.started_on is None:
            return False
        silent = now - task.heard_at
        if silent < self.stall_s:
            return False
        if task.kills >= STALL_KILLS:
            return True
        task.heard_at = now  # told again after another stall_s if the signal is lost (nanny unreachable)
        task.kills += 1
        if task.kills == 1:
            self.stats.stalls += 1
        log.warning(
            "run %s: its task on engine %d reported no progress for %.0f s ([cluster] stall_minutes = %g); "
            "killing that engine, the task goes on elsewhere",
            task.job.run_id,
            task.started_on,
            silent,
            self.stall_s / 60,
        )
        sink.task_stalled(task.job, task.started_on, silent)
        kill_through_nanny(self.client, task.started_on)
        return False

    def _give_up_on_hung_engine(self, task: _InFlight, source: JobSource, sink: ProgressSink) -> Optional[Job]:
        """The engine was told to die STALL_KILLS times and is still registered: the task goes on elsewhere, as
        after a lost engine, and the engine gets no new task (its late result, if any, is not read)."""
        engine = task.started_on
        assert engine is not None
        self._hung.add(engine)
        self.exclude(engine, f"still registered after {STALL_KILLS} kills for a stalled task")
        gone = ipp.error.EngineError(
            f"engine {engine} did not die after {STALL_KILLS} kills for a stalled task "
            f"(its nanny may be gone); it gets no new task"
        )
        return self._lost(task.job, gone, source, sink)

    @staticmethod
    def _wanted(source: JobSource, in_flight: dict, ready: ReadyJobs) -> int:
        """Jobs this scheduler could run at once: running or queued, ready, and not yet started."""
        return len(in_flight) + len(ready) + source.jobs_left()

    def _watch(self, wanted: Optional[int] = None) -> None:
        self._refresh_roster(wanted)
        if self.watchdog is not None:
            self.watchdog.check(self._engine_count)

    def _engine_count(self) -> int:
        return len(set(self.client.ids) & set(self.usable_engines()))

    def _report_progress(self, task: _InFlight, sink: ProgressSink, now: float) -> None:
        data = task.result.data
        update = data.get("progress") if isinstance(data, dict) else None
        if update and update != task.last_update:
            task.last_update = dict(update)
            task.heard_at = now
            sink.task_progress(task.job, update)

    def _lost(self, job: Job, error: BaseException, source: JobSource, sink: ProgressSink) -> Optional[Job]:
        """A task that failed: the job again (its engine was lost, or only its kept checkpoint), or None."""
        if job.held_on is not None and (is_engine_loss(error) or remote_error_name(error) in HELD_LOST):
            self._roll_back(job, source, error)
            if not is_engine_loss(error):
                job.moved = True
                return job  # the engine lives but dropped the checkpoint: nothing else went wrong
        if remote_error_name(error) == TARGETS_GONE and job.held_on is None:
            log.info("run %s: the engines its task was queued for are gone; sending it again", job.run_id)
            job.moved = True
            return job
        if is_engine_loss(error) and job.engine_losses + 1 < MAX_ENGINE_LOSSES:
            job.engine_losses += 1
            self.stats.engine_losses += 1
            log.warning("run %s lost its engine (%s); sending the task to another engine", job.run_id, error)
            sink.engine_lost(job, error)
            job.moved = True
            return job
        traceback = getattr(error, "traceback", None) or _format(error)
        source.on_error(job, error, traceback)
        sink.job_failed(job, error)
        return None

    def _finish(self, task: _InFlight, source: JobSource, sink: ProgressSink) -> Optional[Job]:
        job = task.job
        try:
            result = TaskResult.from_dict(task.result.get())
        except BaseException as error:  # noqa: BLE001 - every remote failure is sorted here
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            return self._lost(job, error, source, sink)
        engine_id = task.result.engine_id
        # the metadata, not a copy: its timestamps may land a moment after the result does
        self._timed.append((engine_id, task_metadata(task.result)))
        self._forget(task.result, len(result.checkpoint or b""))
        stopped = result.stopped
        if stopped in ENGINE_GOING and engine_id is not None:
            self.exclude(engine_id, stopped)
            if self.roster is not None:
                self.roster.engine_leaving(engine_id, stopped)
        if result.shipped:
            job.checkpoint, job.shipped = result.checkpoint, result.position
        if result.batches_run or result.shipped:
            job.epochs_done, job.batches_done = result.position
        if result.batches_run:
            job.engine_losses = 0  # its tasks do run: losses before this one were the engines' bad luck
        job.held_on = engine_id if result.held else None
        job.moved = stopped in ENGINE_GOING
        sink.task_done(job, result, engine_id)
        go_on = source.on_result(job, result, engine_id)
        return job if go_on and not job.finished and not result.diverged else None

    def _count_overheads(self) -> None:
        """Engine-idle seconds before every finished task: from when both the task was submitted and its
        engine had finished the previous one, to the start (ipyparallel fills these in after the result)."""
        rows = []
        for engine_id, metadata in self._timed:
            started, submitted = _timestamp(metadata, "started"), _timestamp(metadata, "submitted")
            completed = _timestamp(metadata, "completed")
            if started is not None and submitted is not None and completed is not None:
                rows.append((engine_id, submitted, started, completed))
        previous: dict[Optional[int], float] = {}
        for engine, submitted, started, completed in sorted(rows, key=lambda row: row[2]):
            free = max(submitted, previous.get(engine, submitted))
            self.stats.dispatch_overheads.append(max(0.0, started - free))
            self.stats.timings.append((engine, submitted, started, completed))
            previous[engine] = completed
        self._timed.clear()

    def _forget(self, result: ipp.AsyncResult, size: int) -> None:
        """The client keeps every result (and so every checkpoint) until told otherwise."""
        try:
            self.client.purge_local_results(result)
        except RuntimeError:  # still outstanding in the client's eyes: nothing to purge yet
            log.debug("result %s not purged", result.msg_ids, exc_info=True)
        # ipyparallel 9 memoises AsyncResult.__len__ (and _count_chunks, split) with class-level lru_caches,
        # which keep the last 128 AsyncResults, each holding its result, alive: 128 checkpoints
        for cached in _ASYNC_RESULT_CACHES:
            cached.cache_clear()
        self._result_bytes_since_collection += size
        if self._result_bytes_since_collection >= RESULT_BYTES_PER_COLLECTION:
            self._result_bytes_since_collection = 0
            gc.collect()


_ASYNC_RESULT_CACHES = [method for method in vars(ipp.AsyncResult).values() if hasattr(method, "cache_clear")]


def _timestamp(metadata: dict, name: str) -> Optional[float]:
    value = metadata.get(name)
    if isinstance(value, str):  # jupyter_client 8 leaves header dates as ISO strings
        value = datetime.datetime.fromisoformat(value)
    return value.timestamp() if value is not None else None


def _format(error: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(error), error, error.__traceback__))

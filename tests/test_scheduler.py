"""The scheduler's decisions, with fake ipyparallel clients (no controller, no engine, no clock).

The fakes stand in for ipyparallel only because these are unit tests of decision logic: a test chooses
what an engine answers (a result, a lost engine, an error) and when, which real engines cannot be made
to do deterministically.  ``FakeClient`` answers every task at once; ``FakeTaskScheduler`` queues tasks
and hands them to free engines as ipyparallel's task scheduler does, and moves one step per loop of the
scheduler, so that a test can kill an engine while another task waits in the queue.  The same scheduler
runs on real engines in test_cluster.py, test_sweep.py, test_elastic.py and benchmarks/faults.py.
"""

from __future__ import annotations

import functools
import gc
from typing import Callable, Optional

import ipyparallel as ipp
import pytest

from controller.errors import ClusterLostError
from controller.work.jobs import ROSTER_CHECK_S, EngineRoster, Job, JobSource, ProgressSink
from controller.work.scheduler import MAX_ENGINE_LOSSES, ReadyJobs, Scheduler
from controller.work.watch import Watchdog
from tests.fakes import FakeClock, FakeResult, TickingClock


class FakeClient:
    """Answers each task at once with ``answer(job spec, checkpoint, epochs[, view targets]) -> (engine id, result
    or error)``; the view targets are the engines the task's load-balanced view allows (None: any)."""

    def __init__(self, answer: Callable, ids=(0, 1)):
        self.answer = answer if answer.__code__.co_argcount == 4 else (lambda s, c, n, targets: answer(s, c, n))
        self.ids = list(ids)
        self.submitted: list[tuple[dict, Optional[bytes]]] = []
        self.aborted: list = []
        self.purged: list[str] = []

        self.views: list[Optional[list[int]]] = [None]  # the targets of each load-balanced view asked for

    def load_balanced_view(self, targets=None):
        self.views.append(targets)
        return self

    def apply_async(self, task, spec, checkpoint, n_epochs):
        self.submitted.append((spec, checkpoint))
        result = FakeResult(f"m{len(self.submitted)}")
        engine_id, outcome = self.answer(spec, checkpoint, n_epochs, self.views[-1])
        result.engine_id = engine_id
        if outcome is None:  # still running: the client knows where from the engine's first message
            result.metadata = {"engine_id": engine_id}
        if isinstance(outcome, BaseException):
            result.set_exception(outcome)
        elif outcome is not None:
            result.set_result(outcome)
        return result

    def abort(self, pending):
        self.aborted.extend(pending)

    def purge_local_results(self, result):
        self.purged.append(result.msg_ids[0])


def epoch_result(checkpoint: Optional[bytes]) -> dict:
    done = int(checkpoint or b"0") + 1
    return {"checkpoint": str(done).encode(), "completed_epochs": done, "epochs": [], "host": "h", "device": "cpu"}


class ListSource(JobSource):
    """A JobSource over a list of jobs that records what the scheduler told it."""

    def __init__(self, jobs: list[Job]):
        self.jobs = list(jobs)
        self.results: list[tuple[str, int, Optional[int]]] = []
        self.errors: list[tuple[str, str]] = []
        self.rollbacks: list[tuple[str, tuple[int, int]]] = []

    def next_job(self):
        return self.jobs.pop(0) if self.jobs else None

    def on_result(self, job, result, engine_id):
        self.results.append((job.run_id, result.completed_epochs, engine_id))
        return True

    def on_error(self, job, error, traceback):
        self.errors.append((job.run_id, str(error)))

    def on_rollback(self, job):
        self.rollbacks.append((job.run_id, job.shipped))

    def exhausted(self):
        return not self.jobs


def job(run_id: str, epochs: int) -> Job:
    return Job(run_id=run_id, spec={"epochs": epochs, "run_id": run_id})


def engine_lost() -> ipp.error.EngineError:
    return ipp.error.EngineError("Engine 1 died while running task 'x'")


class TestAChainOfTasks:
    def test_a_run_is_one_task_per_epoch_each_from_the_last_checkpoint(self):
        client = FakeClient(lambda spec, ckpt, n: (0, epoch_result(ckpt)))
        source = ListSource([job("r-1", 3)])
        Scheduler(client, poll_s=0).run(source)
        assert [ckpt for _, ckpt in client.submitted] == [None, b"1", b"2"]
        assert source.results == [("r-1", 1, 0), ("r-1", 2, 0), ("r-1", 3, 0)]

    def test_finished_results_are_garbage_collected_every_32_mb(self, monkeypatch):
        collections = []
        monkeypatch.setattr(gc, "collect", lambda: collections.append(len(client.submitted)))

        def answer(spec, ckpt, n):  # 12 MB checkpoints: every third result passes 32 MB
            return 0, {
                **epoch_result(None),
                "completed_epochs": len(client.submitted),
                "checkpoint": b"x" * (12 * 1024 * 1024),
            }

        client = FakeClient(answer)
        Scheduler(client, poll_s=0).run(ListSource([job("r-1", 6)]))
        assert collections == [3, 6]

    def test_the_client_forgets_each_result_once_the_source_has_it(self):
        client = FakeClient(lambda spec, ckpt, n: (0, epoch_result(ckpt)))
        Scheduler(client, poll_s=0).run(ListSource([job("r-1", 3)]))
        assert client.purged == ["m1", "m2", "m3"]


class TestALostEngine:
    @staticmethod
    def second_epoch_lost_once():
        answers = iter([(1, epoch_result(None)), (1, engine_lost()), (0, epoch_result(b"1"))])
        return FakeClient(lambda spec, ckpt, n: next(answers))

    def test_the_task_goes_again_from_the_same_checkpoint(self):
        client = self.second_epoch_lost_once()
        source = ListSource([job("r-1", 2)])
        Scheduler(client, poll_s=0).run(source)
        assert [ckpt for _, ckpt in client.submitted] == [None, b"1", b"1"]
        assert source.results == [("r-1", 1, 1), ("r-1", 2, 0)]

    def test_a_loss_is_counted_not_reported_to_the_source_as_an_error(self):
        source = ListSource([job("r-1", 2)])
        stats = Scheduler(self.second_epoch_lost_once(), poll_s=0).run(source)
        assert stats.engine_losses == 1 and source.errors == []

    def test_a_task_whose_engine_unregisters_goes_elsewhere_without_waiting_for_ipyparallels_error(self):
        def answer(spec, ckpt, n):
            if len(client.submitted) == 1:
                client.ids.remove(1)  # the hub drops the engine while the task runs; no reply comes yet
                return 1, None
            return 0, epoch_result(ckpt)

        client = FakeClient(answer)
        source = ListSource([job("r-1", 1)])
        stats = Scheduler(client, poll_s=0).run(source)
        assert source.results == [("r-1", 1, 0)] and stats.engine_losses == 1

    def test_a_task_that_keeps_killing_engines_fails_its_run_alone(self):
        def answer(spec, ckpt, n):
            return (1, engine_lost()) if spec["run_id"] == "r-poison" else (0, epoch_result(ckpt))

        source = ListSource([job("r-poison", 1), job("r-fine", 1)])
        Scheduler(FakeClient(answer), poll_s=0).run(source)
        assert [run for run, _ in source.errors] == ["r-poison"]
        assert source.results == [("r-fine", 1, 0)]

    def test_a_task_is_retried_at_most_max_engine_losses_minus_one_times(self):
        client = FakeClient(lambda spec, ckpt, n: (1, engine_lost()))
        source = ListSource([job("r-poison", 1)])
        Scheduler(client, poll_s=0).run(source)
        assert len(client.submitted) == MAX_ENGINE_LOSSES
        assert source.errors and "died" in source.errors[0][1]

    def test_a_long_run_that_loses_an_engine_now_and_then_is_not_failed_for_it(self):
        def every_other_task_lost(spec, ckpt, n):  # each epoch's first task dies with its engine
            if len(client.submitted) % 2:
                return 1, engine_lost()
            return 0, {**epoch_result(ckpt), "batches_run": 1}

        client = FakeClient(every_other_task_lost)
        source = ListSource([job("r-1", MAX_ENGINE_LOSSES + 1)])
        stats = Scheduler(client, poll_s=0).run(source)
        assert source.errors == [] and source.results[-1][:2] == ("r-1", MAX_ENGINE_LOSSES + 1)
        assert stats.engine_losses == MAX_ENGINE_LOSSES + 1

    def test_an_error_raised_by_the_task_is_not_retried(self):
        client = FakeClient(lambda spec, ckpt, n: (0, ValueError("bad spec")))
        source = ListSource([job("r-1", 3)])
        Scheduler(client, poll_s=0).run(source)
        assert len(client.submitted) == 1 and source.errors == [("r-1", "bad spec")]


class TestTheWatchdog:
    def test_a_dead_controller_ends_the_wait(self):
        alive = [True]
        watchdog = Watchdog(controller_alive=lambda: alive[0], engine_timeout=60, clock=FakeClock())
        watchdog.check(lambda: 2)
        alive[0] = False
        watchdog.clock.now += 1
        with pytest.raises(ClusterLostError, match="controller died"):
            watchdog.check(lambda: 2)

    def test_no_engine_for_engine_timeout_ends_the_wait_and_one_returning_resets_it(self):
        clock = FakeClock()
        watchdog = Watchdog(controller_alive=lambda: True, engine_timeout=30, clock=clock)
        for now, engines in [(0, 0), (20, 0), (25, 1), (30, 0), (55, 0)]:
            clock.now = now
            watchdog.check(lambda engines=engines: engines)  # 25 s without engines at most: no error
        clock.now = 60
        with pytest.raises(ClusterLostError, match=r"no engine has been registered for 30 s.*engine_timeout = 30"):
            watchdog.check(lambda: 0)

    def test_it_looks_at_most_once_per_interval(self):
        calls = []
        clock = FakeClock()
        watchdog = Watchdog(
            controller_alive=lambda: calls.append(clock.now) or True, engine_timeout=30, check_every_s=1.0, clock=clock
        )
        for now in (0, 0.2, 0.5, 1.0, 1.5, 2.1):
            clock.now = now
            watchdog.check(lambda: 1)
        assert calls == [0, 1.0, 2.1]

    def test_a_scheduler_whose_tasks_never_finish_gives_up_with_the_error(self):
        clock = FakeClock()
        client = FakeClient(lambda spec, ckpt, n: (0, None))  # never answered, as with a dead controller
        alive = iter([True, True, False])
        watchdog = Watchdog(controller_alive=lambda: next(alive), engine_timeout=60, check_every_s=0, clock=clock)
        with pytest.raises(ClusterLostError):
            Scheduler(client, poll_s=0.001, watchdog=watchdog).run(ListSource([job("r-1", 1)]))
        assert len(client.aborted) == 1  # the queued task was withdrawn


class KillableClient(FakeClient):
    """A FakeClient whose engines have nannies: ``send_signal`` is recorded in ``signalled``, and the engines it
    is sent to leave the hub; every task's result is kept in ``sent``, in the order sent."""

    def __init__(self, answer: Callable, ids=(0, 1)):
        super().__init__(answer, ids=ids)
        self.signalled: list[tuple[str, list[int]]] = []
        self.sent: list[FakeResult] = []

    def send_signal(self, sig, targets=None, block=None):
        self.signalled.append((sig, list(targets)))
        for engine in targets:  # the nanny kills it; the hub drops it
            self.ids.remove(engine)

    def apply_async(self, task, spec, checkpoint, n_epochs):
        self.sent.append(super().apply_async(task, spec, checkpoint, n_epochs))
        return self.sent[-1]


class TestAStalledTask:
    """A task that began and then reports nothing for stall_s (a hung CUDA kernel or NCCL call: the engine's
    heartbeat thread goes on) has its engine killed through its nanny; the hub then drops the engine, and the
    task goes on elsewhere as after any lost engine."""

    @staticmethod
    def killable(answer, ids=(0, 1)) -> KillableClient:
        return KillableClient(answer, ids=ids)

    def test_its_engine_is_killed_after_stall_s_of_silence_and_the_task_goes_on_elsewhere(self):
        def answer(spec, ckpt, n):
            return (1, None) if len(client.submitted) == 1 else (0, epoch_result(ckpt))  # engine 1 hangs

        client = self.killable(answer)
        ticking = TickingClock()

        def clock() -> float:
            assert ticking.now < 10_000, "the hung task was never ended"
            return ticking()

        source = ListSource([job("r-1", 1)])
        stats = Scheduler(client, poll_s=0, clock=clock, stall_s=30).run(source)
        assert client.signalled == [("SIGKILL", [1])]
        assert source.results == [("r-1", 1, 0)] and source.errors == []
        assert (stats.stalls, stats.engine_losses) == (1, 1)

    def one_long_task(self, clock: Callable[[], float], finished_at: float, batch_at: Callable[[float], Optional[int]]):
        """A client whose one task runs on engine 1 until ``finished_at`` on ``clock``, reporting the batch
        ``batch_at(now)`` (None: nothing new reaches the master then); and the clock the scheduler reads,
        which moves the task along."""
        client = self.killable(lambda spec, ckpt, n: (1, None))
        sent = client.sent

        def reading() -> float:
            now = clock()
            if sent and not sent[-1].done():
                batch = batch_at(now)
                if batch is not None:
                    sent[-1].data = {"progress": {"batch": batch}}
                if now > finished_at:
                    sent[-1].set_result(epoch_result(None))
            return now

        return client, reading

    def test_a_task_that_reports_progress_is_never_killed_however_long_it_runs(self):
        client, clock = self.one_long_task(TickingClock(), finished_at=200, batch_at=lambda now: int(now // 10))
        source = ListSource([job("r-1", 1)])
        stats = Scheduler(client, poll_s=0, clock=clock, stall_s=30).run(source)
        assert client.signalled == [] and stats.stalls == 0
        assert source.results == [("r-1", 1, 1)]

    @pytest.mark.parametrize("lid_closes_at", range(44, 56))
    def test_a_pause_of_the_master_is_not_silence_of_the_engine(self, lid_closes_at):
        """The master sleeps 500 s (stall_s is 30); when it wakes, the engine's progress reaches it a little
        later (its client's thread reads it first): the engine is not killed, whichever of the scheduler's
        readings of the clock the pause falls on."""
        ticking = TickingClock()

        def sleeping_clock() -> float:
            now = ticking()
            if now == lid_closes_at:
                ticking.now = now = lid_closes_at + 500
            return now

        def batch_at(now: float) -> Optional[int]:  # what the engine sent during the sleep arrives 10 s after
            return int(now // 10) if now < lid_closes_at or now >= lid_closes_at + 510 else None

        client, clock = self.one_long_task(sleeping_clock, finished_at=700, batch_at=batch_at)
        source = ListSource([job("r-1", 1)])
        stats = Scheduler(client, poll_s=0, clock=clock, stall_s=30).run(source)
        assert client.signalled == [] and stats.stalls == 0
        assert source.results == [("r-1", 1, 1)]

    def test_an_engine_that_outlives_two_kills_is_given_up_and_the_task_goes_on_elsewhere(self):
        """Its nanny is gone (or the signals are lost): the engine stays registered and silent. After the
        second kill the task goes to another engine, and the hung one gets no new task."""

        def answer(spec, ckpt, n):
            return (1, None) if len(client.submitted) == 1 else (0, epoch_result(ckpt))  # engine 1 hangs

        client = FakeClient(answer, ids=(0, 1))
        client.signalled = []
        client.send_signal = lambda sig, targets=None, block=None: client.signalled.append((sig, list(targets)))
        ticking = TickingClock()

        def clock() -> float:
            assert ticking.now < 10_000, "the task was never taken off the hung engine"
            return ticking()

        source = ListSource([job("r-1", 1)])
        scheduler = Scheduler(client, poll_s=0, clock=clock, stall_s=30)
        stats = scheduler.run(source)
        assert client.signalled == [("SIGKILL", [1]), ("SIGKILL", [1])]
        assert source.results == [("r-1", 1, 0)] and source.errors == []
        assert (stats.stalls, stats.engine_losses) == (1, 1)
        assert scheduler.usable_engines() == [0]

    def test_with_stall_s_0_a_silent_task_is_left_alone(self):
        client, clock = self.one_long_task(TickingClock(), finished_at=1000, batch_at=lambda now: None)
        source = ListSource([job("r-1", 1)])
        Scheduler(client, poll_s=0, clock=clock, stall_s=0).run(source)
        assert client.signalled == [] and source.results == [("r-1", 1, 1)]


class FakeRoster(EngineRoster):
    def __init__(self, leaving=()):
        self.marked = dict.fromkeys(leaving, "drain")
        self.reported: list[tuple[int, str]] = []

    def leaving(self):
        return set(self.marked)

    def engine_leaving(self, engine_id, reason):
        self.reported.append((engine_id, reason))
        self.marked[engine_id] = reason


class TestEnginesThatAreLeaving:
    """A drained engine, or one under a spot notice, gets no new task; its task goes on elsewhere."""

    @staticmethod
    def answer_stopping_on(going: int, reason: str):
        """Engine ``going`` hands its first task back early (no epoch done, checkpoint unchanged) with
        ``stopped=reason``; any other engine trains an epoch. The engine is the lowest the view allows."""

        def answer(spec, ckpt, n, targets):
            engine = min(targets) if targets else going
            if engine == going:
                return engine, {
                    **epoch_result(ckpt),
                    "completed_epochs": int(ckpt or b"0"),
                    "checkpoint": ckpt or b"0",
                    "stopped": reason,
                }
            return engine, epoch_result(ckpt)

        return answer

    def run_stopping_on_engine_0(self, reason: str) -> tuple[FakeClient, "FakeRoster", ListSource]:
        client = FakeClient(self.answer_stopping_on(0, reason))
        roster = FakeRoster()
        source = ListSource([job("r-1", 2)])
        Scheduler(client, poll_s=0, roster=roster).run(source)
        return client, roster, source

    @pytest.mark.parametrize("reason", ["drain", "notice"])
    def test_a_task_stopped_because_its_engine_goes_continues_on_another_engine(self, reason):
        _, _, source = self.run_stopping_on_engine_0(reason)
        assert [engine for _, _, engine in source.results] == [0, 1, 1]
        assert [done for _, done, _ in source.results] == [0, 1, 2], "from the checkpoint it handed back"

    @pytest.mark.parametrize("reason", ["drain", "notice"])
    def test_the_engine_is_reported_leaving_to_the_roster(self, reason):
        _, roster, _ = self.run_stopping_on_engine_0(reason)
        assert roster.reported == [(0, reason)]

    @pytest.mark.parametrize("reason", ["drain", "notice"])
    def test_the_view_no_longer_names_the_leaving_engine(self, reason):
        client, _, _ = self.run_stopping_on_engine_0(reason)
        assert client.views[-1] == [1]

    def test_engines_the_roster_marks_get_no_task(self):
        client = FakeClient(self.answer_stopping_on(0, "drain"), ids=(0, 1, 2))
        source = ListSource([job("r-1", 2)])
        Scheduler(client, poll_s=0, roster=FakeRoster(leaving=[0])).run(source)
        assert [engine for _, _, engine in source.results] == [1, 1]

    def test_with_no_engine_excluded_the_view_names_none_so_engines_that_join_get_work(self):
        client = FakeClient(lambda spec, ckpt, n: (0, epoch_result(ckpt)))
        Scheduler(client, poll_s=0, roster=FakeRoster()).run(ListSource([job("r-1", 1)]))
        assert client.views == [None, None]

    def test_when_every_engine_is_leaving_work_waits_and_the_watchdog_gives_up(self):
        clock = TickingClock()
        client = FakeClient(lambda spec, ckpt, n: (0, epoch_result(ckpt)))
        watchdog = Watchdog(controller_alive=lambda: True, engine_timeout=30, clock=clock)
        with pytest.raises(ClusterLostError, match="no engine"):
            Scheduler(client, poll_s=0.001, watchdog=watchdog, roster=FakeRoster(leaving=[0, 1])).run(
                ListSource([job("r-1", 1)])
            )
        assert client.submitted == []

    def test_an_engine_the_view_names_that_dies_is_dropped_from_the_view_before_the_next_task(self):
        def answer(spec, ckpt, n, targets):
            assert targets is None or set(targets) <= set(client.ids), "a task sent to a view naming a dead engine"
            if len(client.submitted) == 1:
                client.ids.remove(2)  # killed while running the first task
            return (min(targets) if targets else 1), epoch_result(ckpt)

        client = FakeClient(answer, ids=(0, 1, 2))
        source = ListSource([job("r-1", 1), job("r-2", 1)])
        Scheduler(client, poll_s=0, roster=FakeRoster(leaving=[0])).run(source)
        assert client.views[2:] == [[1, 2], [1]] and len(source.results) == 2


class TestCheckpointsKeptOnEngines:
    """checkpoint_minutes: an engine keeps the newest checkpoint; the master sends the run's next task there."""

    @staticmethod
    def batch_result(batches: int, shipped: bool, held: bool = True) -> dict:
        """A task that stood ``batches`` batches into epoch 1 (4 batches an epoch) when it ended."""
        epochs, rest = divmod(batches, 4)
        return {
            "checkpoint": f"b{batches}".encode() if shipped else None,
            "completed_epochs": epochs,
            "batches_done": rest,
            "batches_run": 1,
            "held": held,
            "epochs": [],
            "host": "h",
            "device": "cpu",
        }

    def test_the_next_task_goes_to_the_engine_keeping_the_checkpoint_with_a_reference_in_place_of_it(self):
        answers = iter(
            [
                (1, self.batch_result(1, False)),
                (1, self.batch_result(2, False)),
                (1, self.batch_result(4, True, held=False)),
            ]
        )
        client = FakeClient(lambda spec, ckpt, n: next(answers))
        source = ListSource([job("r-1", 1)])
        Scheduler(client, poll_s=0).run(source)
        assert [ckpt for _, ckpt in client.submitted] == [
            None,
            {"held": "r-1", "epoch": 0, "batches_done": 1},
            {"held": "r-1", "epoch": 0, "batches_done": 2},
        ]
        assert client.views[-2:] == [[1], [1]]
        assert source.results[-1] == ("r-1", 1, 1) and source.rollbacks == []

    @pytest.mark.parametrize(
        "lost",
        [engine_lost(), ipp.error.RemoteError("CheckpointNotHeld", "dropped", "")],
        ids=["engine lost", "checkpoint dropped"],
    )
    def test_when_that_engine_is_lost_the_run_goes_back_to_its_last_shipped_checkpoint(self, lost):
        answers = iter(
            [
                (1, self.batch_result(1, True)),
                (1, self.batch_result(2, False)),
                (1, lost),
                (0, self.batch_result(2, False, held=False)),
                (0, self.batch_result(4, True, held=False)),
            ]
        )
        client = FakeClient(lambda spec, ckpt, n: next(answers))
        source = ListSource([job("r-1", 1)])
        Scheduler(client, poll_s=0).run(source)
        assert client.submitted[3][1] == b"b1", "the bytes the master got last"
        assert source.rollbacks == [("r-1", (0, 1))], "the source forgets the progress after them"
        assert source.results[-1] == ("r-1", 1, 0), "and the run ends on another engine"


class FakeTaskScheduler:
    """A fake ipyparallel client with a task scheduler: tasks wait in one queue, first in first out, and
    each free engine takes the first one its view allows (hwm 1, as ipyparallel's).  An abort, as in
    ipyparallel, goes to the engines registered at that moment, which refuse the task when it reaches
    them (it comes back ``TaskAborted`` and the engine stays free); a task an engine has begun runs on.

    The world moves one step per scheduler loop (``Steps.tick``): a task runs ``spec["steps"]`` steps,
    then answers ``epoch_result``; ``at[step]`` lists what else happens then (an engine killed, ...).
    ``heard_late``: run id -> steps before the client hears which engine began its task (others: at once).
    """

    def __init__(self, ids=(0, 1), heard_late: Optional[dict[str, int]] = None, leaving=()):
        self.ids = list(ids)
        self.now = 0
        self.heard_late = heard_late or {}
        self.leaving = set(leaving)  # engines that hand every task straight back with stopped=notice
        self.running: dict[int, tuple[FakeResult, dict, Optional[bytes], int]] = {}  # engine -> task, end step
        self.queue: list[tuple[FakeResult, dict, Optional[bytes], Optional[list[int]]]] = []
        self.refused: dict[int, set[str]] = {engine: set() for engine in ids}
        self.unheard: list[tuple[int, FakeResult, int]] = []  # (step heard, result, engine)
        self.at: dict[int, list[Callable[[], None]]] = {}
        self.views: list[Optional[list[int]]] = [None]
        self.began: list[tuple[int, str, int]] = []  # (step, run id, engine)
        self.aborted: list[str] = []
        self.purged: list[str] = []

    # what the scheduler calls
    def load_balanced_view(self, targets=None):
        self.views.append(targets)
        return _FakeView(self, targets)

    def abort(self, jobs, block=None):
        msg_ids = [job.msg_ids[0] for job in jobs]
        self.aborted.extend(msg_ids)
        for engine in self.ids:
            self.refused[engine].update(msg_ids)

    def purge_local_results(self, result):
        self.purged.append(result.msg_ids[0])

    # what a test drives
    def kill(self, engine: int) -> None:
        """SIGKILL: the hub drops the engine; ipyparallel would fail its task only 5 s later, so it stays
        unanswered here."""
        self.ids.remove(engine)
        self.running.pop(engine, None)
        for queued in list(self.queue):  # ipyparallel fails a task queued for engines that are all gone
            result, _, _, targets = queued
            if targets is not None and not set(targets) & set(self.ids):
                self.queue.remove(queued)
                result.set_exception(ipp.error.RemoteError("ImpossibleDependency", "unreachable", ""))

    def join(self, engine: int) -> None:
        """A new engine registers with the hub."""
        self.ids.append(engine)
        self.refused[engine] = set()

    def step(self) -> None:
        self.now += 1
        for engine, (result, _spec, checkpoint, ends) in list(self.running.items()):
            if ends <= self.now:
                del self.running[engine]
                answer = epoch_result(checkpoint)
                if engine in self.leaving:
                    answer = {
                        **answer,
                        "completed_epochs": int(checkpoint or b"0"),
                        "checkpoint": checkpoint or b"0",
                        "stopped": "notice",
                    }
                result.set_result(answer)
        for happening in self.at.pop(self.now, []):
            happening()
        self._hear()
        self._dispatch()

    def submit(self, spec: dict, checkpoint, targets) -> FakeResult:
        result = FakeResult(f"m{len(self.began) + len(self.queue)}-{spec['run_id']}-{self.now}")
        self.queue.append((result, spec, checkpoint, targets))
        self._dispatch()
        return result

    def _dispatch(self) -> None:
        for engine in self.ids:
            for queued in list(self.queue):
                if engine in self.running:
                    break
                result, spec, checkpoint, targets = queued
                if targets is not None and engine not in targets:
                    continue
                self.queue.remove(queued)
                if result.msg_ids[0] in self.refused[engine]:
                    result.set_exception(ipp.error.TaskAborted(result.msg_ids[0]))
                    continue
                ends = self.now + (1 if engine in self.leaving else spec.get("steps", 2))
                self.running[engine] = (result, spec, checkpoint, ends)
                self.began.append((self.now, spec["run_id"], engine))
                self.unheard.append((self.now + self.heard_late.get(spec["run_id"], 0), result, engine))
        self._hear()

    def _hear(self) -> None:
        for item in list(self.unheard):
            heard_at, result, engine = item
            if heard_at <= self.now:
                result.engine_id, result.metadata = engine, {"engine_id": engine}
                self.unheard.remove(item)

    def runs_begun_after(self, step: int) -> list[str]:
        return [run for began_at, run, _ in self.began if began_at > step]


class _FakeView:
    def __init__(self, client: FakeTaskScheduler, targets):
        self.client, self.targets = client, targets

    def apply_async(self, task, spec, checkpoint, n_epochs):
        return self.client.submit(spec, checkpoint, self.targets)


class Steps(ProgressSink):
    """Moves the fake world one step per scheduler loop, and hears what the scheduler tells a display."""

    def __init__(self, client: FakeTaskScheduler, clock: Optional["FakeClock"] = None):
        self.client, self.clock = client, clock
        self.withdrawn: list[str] = []
        self.started: list[tuple[str, int]] = []

    def tick(self) -> None:
        self.client.step()
        if self.clock is not None:
            self.clock.now += 0.5

    def task_withdrawn(self, job: Job) -> None:
        self.withdrawn.append(job.run_id)

    def task_started(self, job: Job, engine_id: int) -> None:
        self.started.append((job.run_id, engine_id))


def timed_job(run_id: str, steps: int, epochs: int = 1) -> Job:
    return Job(run_id=run_id, spec={"epochs": epochs, "run_id": run_id, "steps": steps})


class TestALostTaskGoesFirst:
    """A task lost with its engine runs again before any task that was waiting when it was lost."""

    @staticmethod
    def kill_engine_1_while_c_waits() -> tuple[FakeTaskScheduler, Steps, ListSource, Scheduler]:
        """Two engines: A on 0 (3 steps), B on 1 (10 steps), C queued ahead (prefetch 1); engine 1 is killed
        at step 1, so B is lost while C waits for an engine."""
        client = FakeTaskScheduler(ids=(0, 1))
        client.at[1] = [lambda: client.kill(1)]
        source = ListSource([timed_job("A", 3), timed_job("B", 10), timed_job("C", 2)])
        sink = Steps(client)
        scheduler = Scheduler(client, poll_s=0, prefetch=1)
        scheduler.run(source, sink)
        return client, sink, source, scheduler

    def test_the_lost_task_begins_on_the_first_engine_to_free_up_ahead_of_the_queued_one(self):
        client, _, _, _ = self.kill_engine_1_while_c_waits()
        assert client.runs_begun_after(1) == ["B", "C"]

    def test_the_queued_task_is_withdrawn_to_make_way(self):
        client, sink, _, scheduler = self.kill_engine_1_while_c_waits()
        assert sink.withdrawn == ["C"] and scheduler.stats.withdrawn == 1
        assert [msg_id.split("-")[1] for msg_id in client.aborted] == ["C"]

    def test_the_withdrawn_task_loses_nothing_it_runs_once_after_the_lost_one(self):
        _, _, source, scheduler = self.kill_engine_1_while_c_waits()
        assert sorted(source.results) == [("A", 1, 0), ("B", 1, 0), ("C", 1, 0)]
        assert source.errors == [] and scheduler.stats.engine_losses == 1

    def test_a_withdrawn_task_that_an_engine_had_already_begun_runs_and_is_booked_once(self):
        # D begins on engine 0 when A ends, but the client hears of it only 3 steps later: when engine 2 dies
        # meanwhile, D looks queued, is withdrawn, and the abort reaches engine 0 too late
        client = FakeTaskScheduler(ids=(0, 1, 2), heard_late={"D": 3})  # D is sent at step 2, heard at 5
        client.at[3] = [lambda: client.kill(2)]
        source = ListSource([timed_job("A", 1), timed_job("B", 9), timed_job("C", 9), timed_job("D", 4)])
        scheduler = Scheduler(client, poll_s=0)
        scheduler.run(source, Steps(client))
        assert scheduler.stats.withdrawn == 1 and scheduler.stats.withdrawn_late == 1
        assert sorted(source.results) == [("A", 1, 0), ("B", 1, 1), ("C", 1, 0), ("D", 1, 0)]

    def test_without_a_loss_nothing_is_withdrawn(self):
        client = FakeTaskScheduler(ids=(0, 1))
        source = ListSource([timed_job(f"r-{n}", 2 + n % 3, epochs=2) for n in range(5)])
        Scheduler(client, poll_s=0, prefetch=1).run(source, Steps(client))
        assert client.aborted == [] and len(source.results) == 10

    def test_with_nothing_queued_the_lost_task_waits_for_the_first_free_engine(self):
        client = FakeTaskScheduler(ids=(0, 1, 2))
        client.at[1] = [lambda: client.kill(2)]
        source = ListSource([timed_job("A", 3), timed_job("B", 5), timed_job("C", 9)])
        scheduler = Scheduler(client, poll_s=0)  # no prefetch: nothing waits in the queue to withdraw
        scheduler.run(source, Steps(client))
        assert client.aborted == []
        assert client.began[3][1:] == ("C", 0), "on engine 0, the first to free up"

    def test_lost_tasks_go_in_the_order_they_were_lost(self):
        client = FakeTaskScheduler(ids=(0, 1, 2, 3))
        client.at[1] = [lambda: client.kill(2)]
        client.at[2] = [lambda: client.kill(3)]
        source = ListSource(
            [
                timed_job("A", 6),
                timed_job("B", 6),
                timed_job("C", 20),
                timed_job("D", 20),
                timed_job("E", 2),
                timed_job("F", 2),
            ]
        )
        Scheduler(client, poll_s=0, prefetch=1).run(source, Steps(client))
        assert client.runs_begun_after(2)[:2] == ["C", "D"]

    def test_the_sink_hears_on_which_engine_each_task_began(self):
        client, sink, _, _ = self.kill_engine_1_while_c_waits()
        assert sink.started == [("A", 0), ("B", 1), ("B", 0), ("C", 0)]


class TestARunHandedBackByALeavingEngineGoesFirst:
    def test_it_resumes_before_a_task_queued_earlier_and_before_new_runs(self):
        # engine 2 is under a spot notice: it hands B, and then the queued D, straight back
        client = FakeTaskScheduler(ids=(0, 1, 2), leaving=[2])
        source = ListSource(
            [timed_job("A", 6), timed_job("C", 6), timed_job("B", 2), timed_job("D", 2), timed_job("E", 2)]
        )
        Scheduler(client, poll_s=0, prefetch=1, roster=FakeRoster()).run(source, Steps(client))
        handed_back = [run for _, run, engine in client.began if engine == 2]
        assert handed_back == ["B", "D"]
        assert [run for _, run, engine in client.began if engine != 2][2:] == ["B", "D", "E"]


class TestReadyJobs:
    def test_moved_jobs_go_first_oldest_first_then_follow_ups_newest_first(self):
        ready = ReadyJobs()
        for run_id, moved in [("follow-1", False), ("lost-1", True), ("follow-2", False), ("lost-2", True)]:
            ready.push(Job(run_id=run_id, spec={}, moved=moved))
        assert [ready.pop().run_id for _ in range(len(ready))] == ["lost-1", "lost-2", "follow-2", "follow-1"]

    def test_an_empty_queue_pops_none(self):
        assert ReadyJobs().pop() is None


class CountingSource(ListSource):
    """A ListSource that also says how many jobs it will still hand out, as a sweep does."""

    def jobs_left(self) -> int:
        return len(self.jobs)


class DemandRoster(FakeRoster):
    def __init__(self, leaving=(), ready=None):
        super().__init__(leaving)
        self.demand: list[Optional[int]] = []
        if ready is not None:
            self.recorded = set(ready)
            self.ready = lambda: set(self.recorded)  # only a roster that knows says which engines are ready

    def report_demand(self, wanted):
        self.demand.append(wanted)


class TestDemandAndTheRoster:
    """The scheduler reads the roster and reports its demand about once a second, by its own clock."""

    @staticmethod
    def run(roster: DemandRoster, jobs: int = 4, ids=(0, 1), at: Optional[dict] = None) -> FakeTaskScheduler:
        clock = FakeClock()
        client = FakeTaskScheduler(ids=ids)
        for step, happenings in (at or {}).items():  # each gets the client, which exists only from here
            client.at[step] = [functools.partial(happening, client) for happening in happenings]
        source = CountingSource([timed_job(f"r-{n}", 2) for n in range(jobs)])
        Scheduler(client, poll_s=0, prefetch=1, roster=roster, clock=clock).run(source, Steps(client, clock))
        return client

    def test_demand_counts_running_queued_and_not_yet_started_jobs(self):
        roster = DemandRoster()
        self.run(roster, jobs=6)
        assert roster.demand[0] == 6, "3 sent (2 engines + 1 queued) and 3 the source still has"

    def test_demand_is_reported_at_most_once_per_roster_interval(self):
        roster = DemandRoster()
        client = self.run(roster, jobs=6)
        loops = client.now  # the clock moves 0.5 s per loop
        assert len(roster.demand) - 1 <= loops * 0.5 / ROSTER_CHECK_S + 1

    def test_demand_is_withdrawn_when_the_scheduler_ends(self):
        roster = DemandRoster()
        self.run(roster)
        assert roster.demand[-1] is None

    def test_an_engine_marked_leaving_mid_run_gets_no_further_task(self):
        roster = DemandRoster()
        client = self.run(roster, jobs=8, ids=(0, 1, 2), at={3: [lambda client: roster.marked.update({1: "drain"})]})
        assert [engine for began_at, _, engine in client.began if began_at >= 5] and all(
            engine != 1 for began_at, _, engine in client.began if began_at >= 5
        )

    def test_an_engine_that_has_not_reported_itself_gets_no_task_until_it_has(self):
        roster = DemandRoster(ready=[0, 1])
        joined = {3: [lambda client: client.join(2)], 9: [lambda client: roster.recorded.add(2)]}
        client = self.run(roster, jobs=12, at=joined)
        on_2 = [began_at for began_at, _, engine in client.began if engine == 2]
        assert on_2 and min(on_2) >= 9

    def test_with_a_roster_that_knows_readiness_the_view_names_the_ready_engines(self):
        roster = DemandRoster(ready=[0, 1])
        client = self.run(roster, jobs=2)
        assert client.views[-1] == [0, 1]


class TestATaskQueuedForEnginesThatAreGone:
    def test_it_goes_again_when_an_engine_is_ready_and_its_run_does_not_fail(self):
        # engine 1 has not reported itself yet, so the view names engine 0 alone; engine 0 dies with A on it
        # and B queued for it, which ipyparallel then fails as impossible
        clock, roster = FakeClock(), DemandRoster(ready=[0])
        client = FakeTaskScheduler(ids=(0, 1))
        client.at[1] = [lambda: client.kill(0)]
        client.at[4] = [lambda: roster.recorded.add(1)]
        source = ListSource([timed_job("A", 5), timed_job("B", 2)])
        stats = Scheduler(client, poll_s=0, prefetch=1, roster=roster, clock=clock).run(source, Steps(client, clock))
        assert source.errors == []
        assert sorted(source.results) == [("A", 1, 1), ("B", 1, 1)]
        assert stats.engine_losses == 1, "B never began: only A's loss counts"

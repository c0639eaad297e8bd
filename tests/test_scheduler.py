"""The scheduler's decisions, with a fake ipyparallel client (no controller, no engine, no clock).

The fake stands in for ipyparallel only where these tests need to choose what an engine answers
(a result, a lost engine, an error) and when; the same scheduler runs on real engines in
test_cluster.py and test_sweep.py.
"""
from __future__ import annotations

import concurrent.futures
import gc
from typing import Callable, Optional

import ipyparallel as ipp
import pytest

from controller.errors import ClusterLostError
from controller.scheduler import MAX_ENGINE_LOSSES, Job, Scheduler, Watchdog


class FakeResult(concurrent.futures.Future):
    """What ``view.apply_async`` returns: a future with ipyparallel's few extra attributes."""

    def __init__(self, msg_id: str):
        super().__init__()
        self.msg_ids = [msg_id]
        self.engine_id: Optional[int] = None
        self.data: dict = {}
        self.metadata: dict = {}

    def get(self, timeout=None):
        return self.result(timeout)


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


class ListSource:
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
            return 0, {**epoch_result(None), "completed_epochs": len(client.submitted),
                       "checkpoint": b"x" * (12 * 1024 * 1024)}

        client = FakeClient(answer)
        Scheduler(client, poll_s=0).run(ListSource([job("r-1", 6)]))
        assert collections == [3, 6]

    def test_the_client_forgets_each_result_once_the_source_has_it(self):
        client = FakeClient(lambda spec, ckpt, n: (0, epoch_result(ckpt)))
        Scheduler(client, poll_s=0).run(ListSource([job("r-1", 3)]))
        assert client.purged == ["m1", "m2", "m3"]


class TestALostEngine:
    def test_the_task_goes_again_from_the_same_checkpoint(self):
        answers = iter([(1, epoch_result(None)), (1, engine_lost()), (0, epoch_result(b"1"))])
        client = FakeClient(lambda spec, ckpt, n: next(answers))
        source = ListSource([job("r-1", 2)])
        stats = Scheduler(client, poll_s=0).run(source)
        assert [ckpt for _, ckpt in client.submitted] == [None, b"1", b"1"]
        assert source.results == [("r-1", 1, 1), ("r-1", 2, 0)] and not source.errors
        assert stats.engine_losses == 1

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

    def test_an_error_raised_by_the_task_is_not_retried(self):
        client = FakeClient(lambda spec, ckpt, n: (0, ValueError("bad spec")))
        source = ListSource([job("r-1", 3)])
        Scheduler(client, poll_s=0).run(source)
        assert len(client.submitted) == 1 and source.errors == [("r-1", "bad spec")]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TickingClock(FakeClock):
    """A second passes each time it is read."""

    def __call__(self) -> float:
        self.now += 1
        return self.now


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
            watchdog.check(lambda: engines)  # 25 s without engines at most: no error
        clock.now = 60
        with pytest.raises(ClusterLostError, match=r"no engine has been registered for 30 s.*engine_timeout = 30"):
            watchdog.check(lambda: 0)

    def test_it_looks_at_most_once_per_interval(self):
        calls = []
        clock = FakeClock()
        watchdog = Watchdog(controller_alive=lambda: calls.append(clock.now) or True, engine_timeout=30,
                            check_every_s=1.0, clock=clock)
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


class FakeRoster:
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
                return engine, {**epoch_result(ckpt), "completed_epochs": int(ckpt or b"0"),
                                "checkpoint": ckpt or b"0", "stopped": reason}
            return engine, epoch_result(ckpt)
        return answer

    @pytest.mark.parametrize("reason", ["drain", "notice"])
    def test_a_task_stopped_because_its_engine_goes_continues_on_another_engine(self, reason):
        client = FakeClient(self.answer_stopping_on(0, reason))
        roster = FakeRoster()
        source = ListSource([job("r-1", 2)])
        Scheduler(client, poll_s=0, roster=roster).run(source)
        assert roster.reported == [(0, reason)]
        assert [engine for _, _, engine in source.results] == [0, 1, 1]
        assert [done for _, done, _ in source.results] == [0, 1, 2]
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
                ListSource([job("r-1", 1)]))
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
        return {"checkpoint": f"b{batches}".encode() if shipped else None, "completed_epochs": epochs,
                "batches_done": rest, "batches_run": 1, "held": held, "epochs": [], "host": "h", "device": "cpu"}

    def test_the_next_task_goes_to_the_engine_keeping_the_checkpoint_with_a_reference_in_place_of_it(self):
        answers = iter([(1, self.batch_result(1, False)), (1, self.batch_result(2, False)),
                        (1, self.batch_result(4, True, held=False))])
        client = FakeClient(lambda spec, ckpt, n: next(answers))
        source = ListSource([job("r-1", 1)])
        Scheduler(client, poll_s=0).run(source)
        assert [ckpt for _, ckpt in client.submitted] == [
            None, {"held": "r-1", "epoch": 0, "batches_done": 1}, {"held": "r-1", "epoch": 0, "batches_done": 2}]
        assert client.views[-2:] == [[1], [1]]
        assert source.results[-1] == ("r-1", 1, 1) and source.rollbacks == []

    @pytest.mark.parametrize("lost", [engine_lost(), ipp.error.RemoteError("CheckpointNotHeld", "dropped", "")],
                             ids=["engine lost", "checkpoint dropped"])
    def test_when_that_engine_is_lost_the_run_goes_back_to_its_last_shipped_checkpoint(self, lost):
        answers = iter([(1, self.batch_result(1, True)), (1, self.batch_result(2, False)), (1, lost),
                        (0, self.batch_result(2, False, held=False)), (0, self.batch_result(4, True, held=False))])
        client = FakeClient(lambda spec, ckpt, n: next(answers))
        source = ListSource([job("r-1", 1)])
        Scheduler(client, poll_s=0).run(source)
        assert client.submitted[3][1] == b"b1", "the bytes the master got last"
        assert source.rollbacks == [("r-1", (0, 1))]
        assert source.results[-1] == ("r-1", 1, 0)

"""A task lost with its engine goes first, on real ipyparallel engines: the task queued ahead of it is
withdrawn with ipyparallel's abort, refused by the engine that frees up, and sent again afterwards.

tests/test_scheduler.py specifies the same decisions against a fake task scheduler; this checks that
ipyparallel's real abort behaves as that fake says.  Every step happens at a fixed point: the lost task
blocks until its engine is killed, and the surviving engine's task ends only once that engine has been
told to refuse the withdrawn task (its kernel's ``aborted`` set), so nothing depends on timing.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Optional

import ipyparallel as ipp
import pytest

from controller.work.jobs import Job, JobSource, ProgressSink
from engines.spec import TaskResult
from tests.helpers import running_cluster, wait_until


@ipp.interactive  # shipped by value: the engines cannot import this test module
def gated_task(spec: dict, checkpoint, n_epochs: int) -> dict:
    """Runs on an engine: notes that it began (``began`` lines: run id and pid), then
    - "lost", the first time: waits to be killed;
    - "first": waits until this engine has been asked to refuse a queued task (the withdrawal);
    and returns a one-epoch result."""
    import os
    import time
    from pathlib import Path

    from IPython import get_ipython

    folder = Path(spec["folder"])
    attempt = (
        sum(1 for line in (folder / "began").read_text().splitlines() if line.startswith(spec["run_id"]))
        if (folder / "began").exists()
        else 0
    )
    with open(folder / "began", "a") as began:
        began.write(f"{spec['run_id']} {os.getpid()}\n")
    deadline = time.monotonic() + 60
    if spec["run_id"] == "lost" and attempt == 0:
        while time.monotonic() < deadline:
            time.sleep(0.05)
    if spec["run_id"] == "first":
        kernel = get_ipython().kernel
        while not kernel.aborted and time.monotonic() < deadline:
            time.sleep(0.02)
    return {
        "run_id": spec["run_id"],
        "completed_epochs": 1,
        "checkpoint": b"done",
        "epochs": [],
        "host": "engine",
        "pid": os.getpid(),
        "device": "cpu",
    }


class Source(JobSource):
    """Three one-epoch jobs; records each result."""

    def __init__(self, folder: Path):
        self.jobs = [
            Job(run_id=name, spec={"run_id": name, "epochs": 1, "folder": str(folder)}, task=gated_task)
            for name in ("first", "lost", "queued")
        ]
        self.results: list[tuple[str, int]] = []

    def next_job(self) -> Optional[Job]:
        return self.jobs.pop(0) if self.jobs else None

    def on_result(self, job: Job, result: TaskResult, engine_id) -> bool:
        self.results.append((job.run_id, result.pid))
        return True

    def on_rollback(self, job: Job) -> None:
        raise AssertionError("no checkpoint is kept on an engine here")

    def on_error(self, job: Job, error: BaseException, traceback: str) -> None:
        raise AssertionError(f"{job.run_id} failed: {error}")

    def exhausted(self) -> bool:
        return not self.jobs


class Withdrawals(ProgressSink):
    def __init__(self):
        self.withdrawn: list[str] = []

    def task_withdrawn(self, job: Job) -> None:
        self.withdrawn.append(job.run_id)


def began(folder: Path) -> list[tuple[str, int]]:
    path = folder / "began"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(run, int(pid)) for run, pid in (line.split() for line in lines)]


@pytest.fixture(scope="module")
def two_engines(tmp_path_factory, tiny_data_dir):
    with running_cluster(tmp_path_factory.mktemp("cluster"), tiny_data_dir) as cluster:
        yield cluster


def test_a_lost_task_runs_before_the_task_queued_ahead_of_it_which_still_runs_once(two_engines, tmp_path):
    source, sink = Source(tmp_path), Withdrawals()

    def kill_the_lost_tasks_engine() -> None:
        lost = wait_until(lambda: [pid for run, pid in began(tmp_path) if run == "lost"], timeout=60, interval=0.02)
        if lost:
            os.kill(lost[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_the_lost_tasks_engine, daemon=True)
    killer.start()
    stats = two_engines.scheduler(prefetch=1).run(source, sink)  # 2 engines + 1 task queued ahead
    killer.join(timeout=10)

    runs = began(tmp_path)
    killed = next(pid for run, pid in runs if run == "lost")
    survivor = [run for run, pid in runs if pid != killed]
    assert survivor == ["first", "lost", "queued"], "the lost task went ahead of the one queued before it"
    assert sink.withdrawn == ["queued"] and (stats.withdrawn, stats.withdrawn_late) == (1, 0)
    assert sorted(run for run, _ in source.results) == ["first", "lost", "queued"], "each booked once"
    assert stats.engine_losses == 1

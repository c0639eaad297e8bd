"""Short tasks: a run cut anywhere (task_seconds, a drain) resumes mid-epoch to the same weights, in-process;
checkpoints kept on a real engine (checkpoint_minutes) and what losing that engine costs.

Every task of these chains trains at least one batch and stops at a point the test fixes (a tiny
task_seconds stops after every batch; a drain is requested from inside the batch that should be the
last), so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from pathlib import Path
from typing import Callable, Generic, TypeVar

import pytest
import torch

from controller.api import Cluster
from controller.formatting import epochs_progress
from controller.store import RunRecord, Store
from controller.work.jobs import Job, ProgressSink
from controller.work.recorder import RunRecorder
from engines import held
from engines.data import load_mnist
from engines.loop import Setup, TaskResult, TrainingSpec, load_checkpoint, run_task
from engines.process import stopping
from engines.spec import TaskResult as Result
from engines.workloads.cifar import CifarSpec, cifar_setup, load_cifar10, write_cifar10_batches
from engines.workloads.mnist import RunSpec, mnist_setup, train_epochs
from tests.helpers import engines_holding_tasks, running_cluster

EVERY_BATCH = 1e-9  # task_seconds: every task ends after its first batch

SpecT = TypeVar("SpecT", bound=TrainingSpec)


@pytest.fixture(autouse=True)
def no_stop_request_left_behind():
    stopping.clear()
    yield
    stopping.clear()


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    return write_cifar10_batches(tmp_path_factory.mktemp("cifar"), per_batch=4, n_test=4)


@dataclasses.dataclass
class Workload(Generic[SpecT]):
    """A spec and its setup, with a hook that asks for a drain during chosen batches (counted over the run)."""

    spec: SpecT
    build: Callable[[SpecT, torch.device], Setup]
    drain_at: frozenset = frozenset()
    batches_seen: int = 0
    # draw from the global generator each batch, as dropout does: a resumed task must draw what an
    # uninterrupted one would
    noise: bool = False

    def setup(self, device: torch.device) -> Setup:
        work = self.build(self.spec, device)
        augment = work.augment

        def counting(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            self.batches_seen += 1
            if self.batches_seen in self.drain_at:
                stopping.request(stopping.DRAIN)
            if self.noise:
                images = images.float() + torch.rand(images.shape)
            return augment(images, generator) if augment is not None else images

        work.augment = counting
        return work

    def task(self, checkpoint=None, n_epochs=None, **changes) -> TaskResult:
        spec = dataclasses.replace(self.spec, **changes) if changes else self.spec
        return run_task(spec, self.setup, checkpoint, n_epochs)


def mnist(data_dir: Path, **values) -> Workload[RunSpec]:
    data = load_mnist(data_dir)
    spec = RunSpec(run_id="r-mnist", data_dir=str(data_dir), threads=1, epochs=2, batch_size=100, subset=300, **values)
    return Workload(spec, lambda spec, device: mnist_setup(spec, device, data), noise=True)


def cifar(data_dir: Path, **values) -> Workload[CifarSpec]:
    """ResNet18 (VGG16 builds its ImageNet head first: 4 s a task here) on 12 images: 3 batches, augmented
    from the epoch's generator; one epoch, the test's time budget being small."""
    data = load_cifar10(data_dir)
    spec = CifarSpec(
        run_id="r-cifar",
        model="resnet18",
        data_dir=str(data_dir),
        threads=1,
        epochs=1,
        batch_size=4,
        subset=12,
        **values,
    )
    return Workload(spec, lambda spec, device: cifar_setup(spec, device, data))


def weights(result: TaskResult) -> dict:
    assert result.checkpoint is not None  # the results compared are ones that shipped their checkpoint
    return load_checkpoint(result.checkpoint)["model"]


def same_weights(a: TaskResult, b: TaskResult) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def chain(workload: Workload) -> list[TaskResult]:
    """The run as the scheduler drives it: one-epoch tasks, each from the last one's checkpoint, until done;
    a drain is called off after the task it stopped (its engine stays, as if the drain had been cancelled)."""
    results: list[TaskResult] = []
    checkpoint = None
    while not results or results[-1].completed_epochs < workload.spec.epochs:
        result = workload.task(checkpoint, 1)
        results.append(result)
        checkpoint = result.checkpoint
        if result.stopped == stopping.DRAIN:
            again = workload.task(checkpoint, 1)  # a drain is sticky: the next task hands the checkpoint back
            assert again.checkpoint == checkpoint and again.batches_run == 0 and again.stopped == stopping.DRAIN
            stopping.clear(stopping.DRAIN)
        assert len(results) < 100, "a task made no progress"
    return results


@pytest.mark.parametrize("make", [mnist, cifar], ids=["mnist", "cifar-resnet18"])
def test_a_run_cut_after_every_batch_and_by_a_drain_ends_with_the_weights_of_an_uninterrupted_run(
    make, tiny_data_dir, cifar_dir
):
    data_dir = tiny_data_dir if make is mnist else cifar_dir
    whole = make(data_dir).task()
    cut = make(data_dir, task_seconds=EVERY_BATCH)
    cut.drain_at = frozenset({2})
    results = chain(cut)
    batches, epochs = results[0].epoch_batches, cut.spec.epochs
    assert batches == 3 and len(results) == epochs * batches, "one task per batch"
    assert [r.stopped for r in results[:3]] == ["time", "drain", "time"]
    # whole epochs in completed_epochs, the position in batches_done
    assert [(r.completed_epochs, r.batches_done) for r in results] == [
        divmod(n, batches) for n in range(1, epochs * batches + 1)
    ]
    assert [m["epoch"] for r in results for m in r.epochs] == list(range(1, epochs + 1))
    assert same_weights(whole, results[-1])
    # an epoch split over tasks reports what the whole epoch does: loss over all its batches, seconds summed
    split = [m for r in results for m in r.epochs]
    for one, other in zip(whole.epochs, split):
        assert other["train_loss"] == one["train_loss"]
        assert (other["val_accuracy"], other["test_accuracy"], other["lr"]) == (
            one["val_accuracy"],
            one["test_accuracy"],
            one["lr"],
        )
        assert other["seconds"] >= other["train_seconds"] > 0


def test_a_drain_alone_cuts_an_epoch_long_task_where_it_is_asked_for(tiny_data_dir):
    whole = mnist(tiny_data_dir).task()
    cut = mnist(tiny_data_dir)
    cut.drain_at = frozenset({2, 4})
    results = chain(cut)
    assert [(r.stopped, r.completed_epochs, r.batches_done, r.batches_run) for r in results] == [
        ("drain", 0, 2, 2),
        (None, 1, 0, 1),
        ("drain", 1, 1, 1),
        (None, 2, 0, 2),
    ]
    assert same_weights(whole, results[-1])


def test_a_notice_at_task_start_hands_the_checkpoint_back_untrained(tiny_data_dir):
    work = mnist(tiny_data_dir, task_seconds=EVERY_BATCH)
    first = work.task(None, 1)
    stopping.request(stopping.NOTICE)
    back = work.task(first.checkpoint, 1)
    assert back.stopped == "notice" and back.checkpoint == first.checkpoint and back.epochs == []
    assert (back.completed_epochs, back.batches_done, back.batches_run) == (0, 1, 0)
    assert work.batches_seen == 1, "nothing was trained"


class TestCheckpointsKeptOnTheEngine:
    def test_the_engine_keeps_the_checkpoint_until_it_is_due_and_ships_it_at_the_end(self, tiny_data_dir):
        whole = mnist(tiny_data_dir).task()
        work = mnist(tiny_data_dir, task_seconds=EVERY_BATCH, checkpoint_minutes=60)
        first = work.task(None, 1)
        assert first.checkpoint is None and first.held, "kept here, not shipped"
        assert held.held_runs()["r-mnist"] == (0, 1)
        results = [first]
        while results[-1].completed_epochs < 2:
            last = results[-1]
            results.append(work.task(held.reference("r-mnist", last.completed_epochs, last.batches_done), 1))
        assert all(r.checkpoint is None for r in results[:-1])
        assert results[-1].checkpoint is not None and not results[-1].held, "the end of the run ships it"
        assert same_weights(whole, results[-1]) and "r-mnist" not in held.held_runs()

    def test_a_drain_ships_the_kept_checkpoint(self, tiny_data_dir):
        work = mnist(tiny_data_dir, task_seconds=EVERY_BATCH, checkpoint_minutes=60)
        first = work.task(None, 1)
        stopping.request(stopping.DRAIN)
        back = work.task(held.reference("r-mnist", 0, 1), 1)
        assert back.stopped == "drain" and back.checkpoint is not None and not back.held
        assert load_checkpoint(back.checkpoint)["partial"]["batches_done"] == 1 and first.checkpoint is None

    def test_a_reference_to_a_checkpoint_the_engine_does_not_hold_is_refused(self, tiny_data_dir):
        work = mnist(tiny_data_dir, task_seconds=EVERY_BATCH, checkpoint_minutes=60)
        work.task(None, 1)
        with pytest.raises(held.CheckpointNotHeld, match="epoch 0 batch 2 .*holds epoch 0 batch 1"):
            work.task(held.reference("r-mnist", 0, 2), 1)

    def test_a_kept_checkpoint_ships_once_checkpoint_minutes_have_passed(self):
        held.forget("r-x")
        held.resolve("r-x", None, now=0.0)  # the run arrives from the master at t = 0
        assert held.keep_or_ship("r-x", b"1", 0, 1, minutes=1, must_ship=False, now=30.0) == (False, True)
        assert held.keep_or_ship("r-x", b"2", 0, 2, minutes=1, must_ship=False, now=61.0) == (True, True)
        assert held.keep_or_ship("r-x", b"3", 0, 3, minutes=1, must_ship=False, now=90.0) == (False, True)
        assert held.resolve("r-x", held.reference("r-x", 0, 3)) == b"3"
        assert held.keep_or_ship("r-x", b"4", 1, 0, minutes=1, must_ship=True, now=95.0) == (True, False)
        assert "r-x" not in held.held_runs()


def metrics(epoch: int, seconds: float) -> dict:
    return dict(
        epoch=epoch,
        train_loss=0.5,
        val_accuracy=0.9,
        test_accuracy=0.9,
        seconds=seconds,
        train_seconds=seconds,
        images_per_s=100.0,
        lr=0.01,
    )


def test_the_store_shows_a_run_part_way_into_an_epoch_and_resumes_it_from_its_last_shipped_checkpoint(tmp_path):
    store = Store(tmp_path)
    store.runs.create(RunRecord(id="r-1", params={"epochs": 3}))
    recorder, job = RunRecorder(store), Job(run_id="r-1", spec={"epochs": 3})
    recorder.record_result(
        job, Result(epochs=[metrics(1, 2.0)], checkpoint=b"e1", completed_epochs=1, epoch_batches=5, batches_run=5), 0
    )
    recorder.record_result(
        job, Result(checkpoint=b"e1b2", completed_epochs=1, batches_done=2, epoch_batches=5, batches_run=2), 0
    )
    run = store.runs.get("r-1")
    assert epochs_progress(run.epochs_done, 3, run.batches_done, run.epoch_batches) == "1/3, epoch 2 40%"
    assert store.checkpoints.position("r-1") == (1, 2) and store.checkpoints.load("r-1") == (1, b"e1b2")
    assert len(list((tmp_path / "checkpoints" / "r-1").iterdir())) == 1, "only the newest file is kept"
    # a task whose checkpoint its engine kept: progress is recorded, the stored checkpoint stays where it was
    recorder.record_result(
        job,
        Result(
            epochs=[metrics(2, 3.0)],
            checkpoint=None,
            held=True,
            completed_epochs=2,
            batches_done=1,
            epoch_batches=5,
            batches_run=4,
        ),
        1,
    )
    assert (store.runs.get("r-1").epochs_done, store.runs.get("r-1").seconds) == (2, 5.0)
    assert store.checkpoints.position("r-1") == (1, 2)
    # resuming (that engine is gone) goes back to the stored checkpoint: epoch 2 is forgotten and redone
    assert recorder.resume_from_checkpoint("r-1") == (1, 2)
    run = store.runs.get("r-1")
    assert (run.epochs_done, run.batches_done, run.seconds) == (1, 2, 2.0)
    assert [e.epoch for e in store.epochs.of("r-1")] == [1]
    # a task that trained nothing (its engine was going) changes nothing
    recorder.record_result(job, Result(checkpoint=None, completed_epochs=0, stopped="drain"), 1)
    assert store.runs.get("r-1").epochs_done == 1


def test_a_sweeps_pruner_hears_whole_epochs_only(tmp_path):
    import optuna

    from controller.work.sweep.source import SweepSource
    from controller.work.sweep.space import SearchSpace

    study = optuna.create_study(direction="maximize")
    source = SweepSource(study, Store(tmp_path), "s-1", SearchSpace(), {"epochs": 2}, n_trials=1)
    job = source.next_job()
    part = Result(checkpoint=b"p", completed_epochs=0, batches_done=2, epoch_batches=4, batches_run=2)
    assert source.on_result(job, part, 0) is True
    assert study.trials[0].intermediate_values == {}
    job.epochs_done = 1
    whole = Result(epochs=[metrics(1, 1.0)], checkpoint=b"e1", completed_epochs=1, epoch_batches=4, batches_run=2)
    assert source.on_result(job, whole, 0) is True
    assert study.trials[0].intermediate_values == {1: 0.9}


# real engines ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_data_dir):
    with running_cluster(tmp_path_factory.mktemp("cluster"), tiny_data_dir) as cluster:
        yield cluster


class _InterruptAt(ProgressSink):
    """Ctrl-C on the master as it sends the task that goes on from ``position`` (stored by then)."""

    def __init__(self, position: tuple[int, int]):
        self.position = position

    def task_submitted(self, job) -> None:
        if job.position == self.position:
            raise KeyboardInterrupt


def uninterrupted_weights(params: dict) -> dict:
    checkpoint = train_epochs({**params, "task_seconds": 0}).checkpoint
    assert checkpoint is not None  # task_seconds 0: one task runs to the end of the run, which ships it
    return load_checkpoint(checkpoint)["model"]


def test_an_interrupted_run_resumes_mid_epoch_to_the_weights_of_an_uninterrupted_one(cluster):
    with pytest.raises(KeyboardInterrupt):
        cluster.train(_InterruptAt((0, 2)), epochs=2, subset=200, batch_size=50, task_seconds=EVERY_BATCH)
    run = cluster.store.runs.all(limit=1)[0]
    assert (run.state, run.epochs_done, run.batches_done) == ("interrupted", 0, 2)
    assert cluster.store.checkpoints.position(run.id) == (0, 2)
    resumed = cluster.resume(run.id).run
    assert resumed.state == "completed" and (resumed.epochs_done, resumed.batches_done) == (2, 0)
    assert [e.epoch for e in cluster.store.epochs.of(run.id)] == [1, 2]
    stored = load_checkpoint(cluster.store.checkpoints.load(run.id)[1])["model"]
    whole = uninterrupted_weights(run.params)
    assert all(torch.equal(whole[k], stored[k]) for k in whole)


def test_a_run_keeps_its_checkpoint_on_its_engine_and_losing_that_engine_costs_only_what_was_not_shipped(
    cluster, tmp_path
):
    """Last in this module: it leaves the cluster with one engine."""
    holder = tmp_path / "holder-pid"
    engines = {e.pid: e.engine_id for e in cluster.store.engines.of(cluster.record.id)}
    outcome: list = []

    def train() -> None:  # the master, as `cluster train` runs it
        with Cluster(cluster.config) as master:
            try:
                outcome.append(
                    master.train(epochs=2, subset=200, batch_size=50, task_seconds=EVERY_BATCH, checkpoint_minutes=60)
                )
            except BaseException as error:  # noqa: BLE001 - the test reports it
                outcome.append(error)

    # the task that goes on from the checkpoint kept one batch into epoch 2 waits inside its engine
    when = (
        f"isinstance(checkpoint, dict) and (checkpoint['epoch'], checkpoint['batches_done']) == (1, 1) "
        f"and open({str(holder)!r}, 'w').write(str(os.getpid())) > 0"
    )
    with engines_holding_tasks(cluster.client, tmp_path, when=when) as held:
        master = threading.Thread(target=train, daemon=True)
        master.start()
        assert held.wait(), "the run never reached epoch 2"
        victim_pid = int(holder.read_text())
        victim, survivor = engines[victim_pid], next(e for p, e in engines.items() if p != victim_pid)
        run = cluster.store.runs.all(limit=1)[0]
        # every task so far went to the engine holding the checkpoint, and none crossed to the master:
        # the store shows the progress (epoch 2, 25% in) and still resumes (from scratch)
        assert (run.epochs_done, run.batches_done, run.epoch_batches) == (1, 1, 4)
        assert [(e.epoch, e.engine_id) for e in cluster.store.epochs.of(run.id)] == [(1, victim)]
        assert cluster.store.checkpoints.position(run.id) is None
        os.kill(victim_pid, signal.SIGKILL)
        held.release()  # the survivor passes the same point when it redoes the run
        master.join(timeout=180)
    assert not master.is_alive() and outcome and not isinstance(outcome[0], BaseException), outcome
    run = outcome[0].run
    assert run.state == "completed" and run.epochs_done == 2
    # rolled back to the last shipped checkpoint (none: the start) and redone on the survivor
    assert [(e.epoch, e.engine_id) for e in cluster.store.epochs.of(run.id)] == [(1, survivor), (2, survivor)]
    assert cluster.store.checkpoints.position(run.id) == (2, 0), "the end of the run ships the checkpoint"
    whole = uninterrupted_weights(run.params)
    stored = load_checkpoint(cluster.store.checkpoints.load(run.id)[1])["model"]
    assert all(torch.equal(whole[k], stored[k]) for k in whole), "the same weights as an uninterrupted run"

"""Batch inference: one trained model applied to a whole split, shards spread over real local engines."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import ipyparallel as ipp
import numpy as np
import pytest
import torch

from controller.cli import main
from controller.errors import TaskError, UsageError
from controller.work.bench import BenchTable
from controller.work.inference import EVAL_BATCH, Inference, InferenceResult, shard_bounds, write_predictions
from engines.data import load_mnist
from engines.predict import LoadedModel, build, predict
from engines.workloads.cifar import load_cifar10, write_cifar10_batches
from tests.fakes import FakeResult, TickingClock
from tests.helpers import real_mnist_dir, running_cluster

DATA = real_mnist_dir()


def test_shards_are_contiguous_cover_everything_once_and_start_on_batch_boundaries():
    for n, shards in ((10_000, 4), (10_000, 3), (2_500, 8), (999, 2), (1, 5)):
        bounds = shard_bounds(n, shards)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a < b for a, b in bounds)
        assert all(b == a2 for (_, b), (a2, _) in zip(bounds, bounds[1:])), "contiguous, in order"
        assert all(a % EVAL_BATCH == 0 for a, _ in bounds)
    assert len(shard_bounds(10_000, 4)) == 4 and len(shard_bounds(2_500, 8)) == 3  # no shard without a batch


@pytest.mark.parametrize("kind", ["mnist", "cifar"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_batch_an_engine_predicts_in_divides_every_shard_boundary(kind, device):
    """Shards start at multiples of EVAL_BATCH; an engine's batches must tile them, as one process's do."""
    loaded = LoadedModel(model=None, normalise=None, device=torch.device(device), kind=kind, spec={})
    assert EVAL_BATCH % loaded.batch == 0
    if kind == "mnist" and device == "cpu":
        assert loaded.batch < EVAL_BATCH, "the CNN is evaluated faster on a CPU in small batches"


class HangingShards:
    """A client whose load-balanced view hands shards to its engines in turn: ``hung`` engines
    take their shard and go silent; the others answer at once. A SIGKILL ends a hung engine's shard as the hub
    does when the engine dies (EngineError), unless ``dies`` is False (its nanny is gone)."""

    def __init__(self, hung=(1,), dies=True):
        self.hung, self.dies = set(hung), dies
        self.ids = [0, 1]
        self.signalled: list[tuple[str, list[int]]] = []
        self.started: list[tuple[int, int]] = []  # (engine, first image) of each shard sent
        self.running: dict[int, FakeResult] = {}

    def load_balanced_view(self, targets=None):
        return _ShardView(self, targets)

    def apply_async(self, task, key, kind, data_dir, split, a, b):
        engine = self.ids[len(self.started) % len(self.ids)]
        self.started.append((engine, a))
        result = FakeResult(f"m{len(self.started)}")
        result.metadata = {"engine_id": engine}
        if engine in self.hung:
            self.running[engine] = result
        else:
            result.set_result({"start": a, "stop": b})
        return result

    def send_signal(self, sig, targets=None, block=None):
        self.signalled.append((sig, list(targets)))
        for engine in targets:
            if self.dies:
                self.hung.discard(engine)
                self.ids.remove(engine)
                self.running.pop(engine).set_exception(ipp.error.EngineError(f"engine {engine} died"))

    def abort(self, pending):
        pass


class _ShardView:
    """As ipyparallel's view: one that names an engine no longer registered refuses new tasks (KeyError)."""

    def __init__(self, client: HangingShards, targets):
        self.client, self.targets = client, targets

    def apply_async(self, *args):
        for engine in self.targets or ():
            if engine not in self.client.ids:
                raise KeyError(engine)
        return self.client.apply_async(*args)


def bounded_clock():
    """A second passes at each reading; a job still waiting after 10,000 of them never ends."""
    clock = TickingClock()

    def read() -> float:
        assert clock.now < 10_000, "the hung shard was never ended"
        return clock()

    return read


class TestAHungShard:
    """A shard that began and reports no images for stall_s (a hung CUDA kernel: the heartbeat goes on) has its
    engine killed, and its images go to another engine."""

    def test_its_engine_is_killed_and_the_images_go_to_another(self):
        client = HangingShards(hung=(1,))
        job = Inference(client, [0, 1], poll_s=0, stall_s=30, clock=bounded_clock())
        parts = job._predict("k", "mnist", "d", "test", [(0, 100), (100, 200)], 200, progress=None)
        assert sorted(parts) == [0, 100]
        assert client.signalled == [("SIGKILL", [1])]
        assert client.started[-1] == (0, 100), "the hung engine's images went to the other engine"

    def test_an_engine_that_outlives_two_kills_fails_the_job_by_name(self):
        client = HangingShards(hung=(1,), dies=False)
        job = Inference(client, [0, 1], poll_s=0, stall_s=30, clock=bounded_clock())
        with pytest.raises(
            TaskError,
            match=r"images 100:200: engine 1 reported nothing for \d+ s and did not die "
            r"after 2 kills",
        ):
            job._predict("k", "mnist", "d", "test", [(0, 100), (100, 200)], 200, progress=None)
        assert client.signalled == [("SIGKILL", [1])] * 2

    def test_a_pause_of_the_master_is_not_silence_of_the_engine(self):
        """The master is frozen for 500 s (stall_s is 30) while the shard runs; it then finishes."""
        client = HangingShards(hung=(1,))
        clock = TickingClock()

        def freezing_clock() -> float:
            now = clock()
            if now == 10:
                clock.now = now = 510
            if now == 515:  # the shard ends soon after the master wakes
                client.running.pop(1).set_result({"start": 100, "stop": 200})
            return now

        job = Inference(client, [0, 1], poll_s=0, stall_s=30, clock=freezing_clock)
        parts = job._predict("k", "mnist", "d", "test", [(0, 100), (100, 200)], 200, progress=None)
        assert sorted(parts) == [0, 100] and client.signalled == []

    def test_with_stall_s_0_a_silent_shard_is_left_alone(self):
        client = HangingShards(hung=(1,))
        clock = TickingClock()

        def ending_clock() -> float:
            now = clock()
            if now == 1000:
                client.running.pop(1).set_result({"start": 100, "stop": 200})
            return now

        job = Inference(client, [0, 1], poll_s=0, stall_s=0, clock=ending_clock)
        assert sorted(job._predict("k", "mnist", "d", "test", [(0, 100), (100, 200)], 200, progress=None)) == [0, 100]
        assert client.signalled == []


def example_result() -> InferenceResult:
    return InferenceResult(
        split="test",
        kind="mnist",
        run_id="r-1",
        checkpoint="k",
        engines=[0, 1],
        shards=2,
        seconds=0.5,
        predictions=np.array([3, 1, 2]),
        labels=np.array([3, 1, 1]),
        probabilities=np.eye(10, dtype=np.float32)[[3, 1, 2]],
    )


def test_predictions_are_written_as_csv_or_npz_and_nothing_else(tmp_path):
    result = example_result()
    rows = list(csv.DictReader(open(write_predictions(result, tmp_path / "p.csv"))))
    assert [r["index"] for r in rows] == ["0", "1", "2"] and rows[2]["prediction"] == "2"
    assert list(rows[0]) == ["index", "label", "prediction", *(f"p{c}" for c in range(10))]
    saved = np.load(write_predictions(result, tmp_path / "p.npz"))
    assert saved["predictions"].tolist() == [3, 1, 2] and saved["probabilities"].shape == (3, 10)
    with pytest.raises(UsageError, match=r"\.csv or \.npz"):
        write_predictions(result, tmp_path / "p.txt")
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.confusion()[1][2] == 1 and sum(map(sum, result.confusion())) == 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Real MNIST (linked) beside a small synthetic CIFAR-10, so one cluster serves both workloads."""
    if DATA is None:
        pytest.skip("real MNIST is not in ../shared/data")
    folder = tmp_path_factory.mktemp("data")
    (folder / "MNIST").symlink_to(DATA / "MNIST")
    return write_cifar10_batches(folder, per_batch=16, n_test=48)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, data_dir):
    with running_cluster(tmp_path_factory.mktemp("infer"), data_dir) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def mnist_run(cluster):
    return cluster.train(epochs=1, subset=2000, batch_size=100).run


def single_process(checkpoint: bytes, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The reference: one loop in this process, at the engines' thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return predict(build(checkpoint, "cpu"), images)
    finally:
        torch.set_num_threads(threads)


def test_two_engines_return_every_prediction_once_in_order_equal_to_one_process(cluster, mnist_run, data_dir):
    _, checkpoint = cluster.store.checkpoints.load(mnist_run.id)
    seen = []
    result = cluster.infer(mnist_run.id, shards_per_engine=2, progress=lambda done, total: seen.append((done, total)))
    test = load_mnist(data_dir).test
    assert result.images == len(test) and result.shards == 4 and result.engines == [0, 1]
    assert np.array_equal(result.labels, test.labels.numpy())
    predictions, probabilities = single_process(checkpoint, test.images)
    assert np.array_equal(result.predictions, predictions)
    assert np.array_equal(result.probabilities, probabilities)
    assert seen and seen[-1] == (len(test), len(test))


def test_the_model_stays_loaded_on_each_engine_for_later_calls(cluster, mnist_run):
    _, checkpoint = cluster.store.checkpoints.load(mnist_run.id)
    job = Inference(cluster.client, [0, 1], threads=1)
    job.run(checkpoint, "val", str(cluster.config.data_dir))
    first = job.loaded_now
    job.run(checkpoint, "val", str(cluster.config.data_dir))
    assert job.loaded_now == [] and first in ([], [0, 1])  # [] when an earlier test loaded it already


def test_cluster_infer_writes_a_csv_whose_accuracy_is_the_runs_test_accuracy(cluster, mnist_run, tmp_path):
    out = tmp_path / "predictions.csv"
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["--config", cluster.config.source, "infer", "--run", mnist_run.id, "--out", str(out), "--json"]
    code = main(argv, stdout=stdout, stderr=stderr)
    assert code == 0, stderr.getvalue()
    summary = json.loads(stdout.getvalue())
    rows = list(csv.DictReader(open(out)))
    assert [int(r["index"]) for r in rows] == list(range(10_000))
    accuracy = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    assert accuracy == summary["accuracy"] == mnist_run.test_accuracy
    assert sum(map(sum, summary["confusion"])) == 10_000 and summary["images_per_s"] > 0


def test_a_model_of_another_workload_is_refused_by_name(cluster, mnist_run):
    with pytest.raises(UsageError, match="holds a mnist model, not a cifar one"):
        cluster.infer(mnist_run.id, workload="cifar10-resnet18")
    with pytest.raises(UsageError, match="--run r-nope: no such run"):
        cluster.infer("r-nope")


@pytest.mark.parametrize("workload", ["cifar10-resnet18", "cifar10-vgg16"])
def test_cifar_runs_from_cluster_bench_predict_over_two_engines(cluster, data_dir, workload, tmp_path):
    bench = cluster.bench(workload=workload, engines=[1], epochs=1, data_dir=str(data_dir))
    (record,) = bench.records
    (trial,) = BenchTable(cluster.store).trials(record.id)
    run_id = trial.run_id
    result = cluster.infer(run_id, workload=workload, out=tmp_path / "preds.npz")
    test = load_cifar10(data_dir).test
    saved = np.load(tmp_path / "preds.npz")
    assert result.kind == "cifar" and result.images == len(test) == len(saved["predictions"])
    assert np.array_equal(saved["labels"], test.labels.numpy())
    assert result.accuracy == pytest.approx(cluster.store.runs.get(run_id).test_accuracy)


def test_a_shard_that_hangs_on_a_real_engine_has_it_killed_and_its_images_go_to_the_other(
    cluster, mnist_run, data_dir, tmp_path, caplog
):
    """Last in this file: it kills one of the module cluster's two engines.

    The first shard to begin (on whichever engine) is held before its first image until the test lets go (at
    most two minutes), as a hung CUDA kernel would hold it while the engine's heartbeat goes on. After 15 s
    of silence the master kills that engine through its nanny and the other engine predicts those images
    too: every prediction comes back once, equal to one process's. Were the engine not killed, the hold would
    end after two minutes and the job would finish on the held engine."""
    import logging

    from controller.ipp import processes

    held, gate = tmp_path / "held", tmp_path / "go"
    install = f"""
import os, time
import engines.predict as _infer
_infer._unheld_predict_shard = getattr(_infer, "_unheld_predict_shard", _infer.predict_shard)
def _held_predict_shard(*args, _unheld=_infer._unheld_predict_shard, **kwargs):
    try:  # O_EXCL: of two shards that begin at once, one only is held
        os.close(os.open({str(held)!r}, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return _unheld(*args, **kwargs)
    deadline = time.monotonic() + 120
    while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:
        time.sleep(0.02)
    return _unheld(*args, **kwargs)
_infer.predict_shard = _held_predict_shard
"""
    _, checkpoint = cluster.store.checkpoints.load(mnist_run.id)
    engines = cluster.store.engines.of(cluster.record.id)
    cluster.client[:].execute(install, block=False).get(timeout=60)
    try:
        with caplog.at_level(logging.WARNING, logger="controller.work.inference"):
            result = Inference(cluster.client, [0, 1], threads=1, stall_s=15).run(
                checkpoint, "test", str(data_dir), run_id=mnist_run.id
            )
    finally:
        gate.touch()
    assert held.exists(), "no shard was held"
    [hung] = [e for e in engines if not processes.pid_alive(e.pid)]
    test = load_mnist(data_dir).test
    assert result.images == len(test) and np.array_equal(result.labels, test.labels.numpy())
    predictions, _ = single_process(checkpoint, test.images)
    assert np.array_equal(result.predictions, predictions)
    assert f"engine {hung.engine_id} reported nothing for" in caplog.text, caplog.text

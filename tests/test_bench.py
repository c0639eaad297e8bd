"""`cluster bench`: workloads, the CIFAR-10 reader and models, and a tiny bench on 2 real local engines."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from controller.errors import UsageError
from controller.work.bench import WORKLOADS, BenchTable, parse_engine_counts
from controller.work.bench.runner import BenchSink, region_of
from controller.work.sweep.space import PAPER_L1
from engines.data import DataError
from engines.tasks import cifar_task
from engines.workloads.cifar import build_model, load_cifar10, read_batch, train_cifar, write_cifar10_batches
from tests.helpers import running_cluster

PRICE = 0.36  # $/hour of the whole 2-engine local cluster: 0.18 per engine


# no cluster -----------------------------------------------------------------------
def test_engine_counts_and_regions():
    assert parse_engine_counts("4,1,2,2") == [1, 2, 4]
    assert parse_engine_counts(None) is None
    for bad in ("0", "1,x", "-1"):
        with pytest.raises(UsageError, match="--engines"):
            parse_engine_counts(bad)
    assert region_of("aws", "us-east-1a") == "us-east-1"
    assert region_of("aws", "eu-central-1b") == "eu-central-1"
    assert region_of("aws", "", "us-west-2") == "us-west-2"
    assert region_of("local", "") == ""


def test_paper_workload_is_the_lambda_grid():
    runs = WORKLOADS["paper"].runs(None)
    assert [spec["l1"] for _, spec in runs] == [0.0, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]
    assert {spec["epochs"] for _, spec in runs} == {1}
    assert WORKLOADS["cifar10-vgg16"].runs(None) == [("vgg16", {"epochs": 5})]
    assert WORKLOADS["mnist-cnn"].runs(3) == [("cnn", {"epochs": 3})]


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    # 5 batches of 16 images: 72 train, 8 validation, 32 test
    return write_cifar10_batches(tmp_path_factory.mktemp("cifar"), per_batch=16, n_test=32)


def test_cifar_batches_load_and_split(cifar_dir):
    data = load_cifar10(cifar_dir)
    assert tuple(data.train.images.shape) == (72, 3, 32, 32) and data.train.images.dtype.is_floating_point is False
    assert len(data.val) == 8 and len(data.test) == 32
    assert int(data.train.labels.max()) <= 9


def test_cifar_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no CIFAR-10 here.*never downloaded"):
        load_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with pytest.raises(DataError, match="data_batch_1: missing"):
        load_cifar10(tmp_path)
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_1: not a CIFAR-10 python batch"):
        read_batch(folder / "data_batch_1")
    with open(folder / "data_batch_2", "wb") as handle:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, handle)
    with pytest.raises(DataError, match=r"data_batch_2: data is uint8 \(4, 100\), expected uint8 N x 3072"):
        read_batch(folder / "data_batch_2")
    with open(folder / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(DataError, match="4 images but 2 labels"):
        read_batch(folder / "data_batch_3")


class _RunsACommand:
    """What a planted batch file would hold: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_cifar_batch_that_would_run_code_is_refused_without_running_it(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"
    with open(folder / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": _RunsACommand(marker), b"labels": [0]}, handle)
    with pytest.raises(
        DataError,
        match=r"data_batch_1: not a CIFAR-10 python batch .*refused to load "
        r"(posix|os)\.system",
    ):
        read_batch(folder / "data_batch_1")
    assert not marker.exists(), "loading the batch ran the planted command"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_still_load(tmp_path, protocol):
    path = tmp_path / "test_batch"
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    with open(path, "wb") as handle:
        pickle.dump(
            {b"batch_label": b"x", b"data": data, b"labels": [3, 7], b"filenames": [b"a", b"b"]},
            handle,
            protocol=protocol,
        )
    images, labels = read_batch(path)
    assert images.shape == (2, 3, 32, 32) and (images.reshape(2, 3072) == data).all()
    assert labels.tolist() == [3, 7]


def test_a_checkpoint_holding_code_is_refused_by_the_engine(tmp_path):
    import torch

    from engines.loop import load_checkpoint

    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "model": _RunsACommand(marker)}, buffer)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(buffer.getvalue())
    assert not marker.exists()


def test_models_are_torchvisions_adapted_to_cifar():
    import torch

    torch.set_num_threads(1)
    for name, parameters in (("vgg16", 15.0e6), ("resnet18", 11.2e6)):
        model = build_model(name).eval()
        assert type(model).__module__.startswith("torchvision.models")
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=0.05)
        with torch.inference_mode():
            assert tuple(model(torch.zeros(2, 3, 32, 32)).shape) == (2, 10)
    with pytest.raises(ValueError, match="expected one of vgg16, resnet18"):
        build_model("alexnet")


def test_vgg16_task_trains_and_resumes(cifar_dir):
    spec = dict(model="vgg16", data_dir=str(cifar_dir), epochs=2, batch_size=36, threads=1, run_id="r-vgg")
    first = cifar_task(spec, None, 1)  # the engine function, called in-process
    assert first["completed_epochs"] == 1 and len(first["epochs"]) == 1
    metrics = first["epochs"][0]
    assert metrics["images_per_s"] * metrics["train_seconds"] == pytest.approx(72)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    second = train_cifar(spec, first["checkpoint"], 1)
    assert second.completed_epochs == 2 and [e["epoch"] for e in second.epochs] == [2]


# a real cluster --------------------------------------------------------------------
@pytest.fixture(scope="module")
def priced_cluster(tmp_path_factory, tiny_data_dir):
    """A real 2-engine local cluster on tiny MNIST with a configured $/hour; stopped afterwards."""
    with running_cluster(
        tmp_path_factory.mktemp("bench-cluster"), tiny_data_dir, extra=f"price_per_hour = {PRICE}"
    ) as cluster:
        yield cluster


class Recorder(BenchSink):
    def __init__(self):
        self.events: list[tuple] = []

    def bench_started(self, workload, engines, runs):
        self.events.append(("started", workload.name, tuple(engines), runs))

    def task_done(self, job, result, engine_id):
        self.events.append(("task", job.run_id, engine_id))

    def bench_finished(self, record):
        self.events.append(("finished", record.engines))


def test_tiny_paper_bench_on_1_and_2_engines_stores_its_records(priced_cluster):
    sink = Recorder()
    result = priced_cluster.bench("paper", engines=[1, 2], subset=120, progress=sink)
    assert [r.engines for r in result.records] == [1, 2]
    assert [e[0] for e in sink.events if e[0] != "task"] == ["started", "finished", "started", "finished"]
    assert sum(1 for e in sink.events if e[0] == "task") == 18

    stored = BenchTable(priced_cluster.store).records(bench_ids=[result.bench_id])
    assert [dataclasses.asdict(r) for r in stored] == [dataclasses.asdict(r) for r in result.records]
    for record in stored:
        assert record.state == "completed" and record.workload == "paper" and record.provider == "local"
        assert record.runs == 9 and record.epochs == 9 and record.images == 9 * 120
        assert record.wall_s > 0 and record.warmup_s > 0 and record.dispatch_s >= 0
        assert record.epochs_per_min == pytest.approx(9 / (record.wall_s / 60))
        assert record.images_per_s == pytest.approx(9 * 120 / record.wall_s)
        assert 0.0 <= record.accuracy <= 1.0
        # each engine carries half the cluster's price; cost = $/hour × hours
        assert record.price_per_hour == pytest.approx(PRICE / 2 * record.engines)
        assert record.cost == pytest.approx(record.price_per_hour * record.wall_s / 3600)
        assert record.gpu.endswith("(CPU)") and record.torch and record.threads == 1
        assert record.params["subset"] == 120 and record.params["epochs"] == 1

        engines = BenchTable(priced_cluster.store).engines(record.id)
        assert len(engines) == record.engines
        assert sum(e.tasks for e in engines) == 9 and sum(e.images for e in engines) == 9 * 120
        assert all(e.price_per_hour == pytest.approx(PRICE / 2) and e.device == "cpu" for e in engines)

        trials = BenchTable(priced_cluster.store).trials(record.id)
        assert [t.l1 for t in trials] == list(PAPER_L1)
        assert all(t.state == "completed" and t.epochs == 1 for t in trials)
        assert {t.engine_id for t in trials} == {e.engine_id for e in engines}
        runs = [priced_cluster.store.runs.get(t.run_id) for t in trials]
        assert all(run.state == "completed" and run.params["l1"] == t.l1 for run, t in zip(runs, trials))
    # on 2 engines both took part
    assert all(e.tasks > 0 for e in BenchTable(priced_cluster.store).engines(result.records[1].id))

    text = priced_cluster.report("md", bench_ids=[result.bench_id])
    assert f"| local | - | {stored[0].gpu} | - | {stored[0].wall_s:.1f} | $0.180 | ${stored[0].cost:.4f} |" in text
    assert priced_cluster.report("html", bench_ids=[result.bench_id]).count("data:image/png;base64,") == 4


def test_cifar_resnet18_bench_runs_on_an_engine(priced_cluster, cifar_dir):
    result = priced_cluster.bench("cifar10-resnet18", engines=[1], epochs=1, data_dir=str(cifar_dir))
    (record,) = result.records
    assert record.workload == "cifar10-resnet18" and record.runs == 1 and record.epochs == 1
    assert record.images == 72 and record.params["model"] == "resnet18"
    assert record.accuracy is not None


def test_bench_refuses_more_engines_than_the_cluster_has(priced_cluster):
    with pytest.raises(UsageError, match="has 2 live engine"):
        priced_cluster.bench("paper", engines=[1, 4])
    with pytest.raises(UsageError, match="--workload"):
        priced_cluster.bench("imagenet")


def test_cli_bench_json_and_a_failing_workload(priced_cluster, tmp_path):
    from controller.cli import main

    ini = tmp_path / "cluster.ini"
    config = priced_cluster.config
    ini.write_text(
        f"[cluster]\nname = {config.cluster.name}\nstate_dir = {config.state_dir}\n"
        f"data_dir = {config.data_dir}\nthreads_per_engine = 1\ndownload = false\n"
    )
    stdout, stderr = io.StringIO(), io.StringIO()
    code = main(
        ["--config", str(ini), "bench", "--workload", "mnist-cnn", "--subset", "60", "--json"],
        stdout=stdout,
        stderr=stderr,
    )
    assert code == 0, stderr.getvalue()
    document = json.loads(stdout.getvalue())
    (record,) = document["records"]
    assert record["engines"] == 2 and record["runs"] == 1 and record["images"] == 60
    assert "bench mnist-cnn on 2 engine(s)" in stderr.getvalue()

    # no CIFAR-10 under the tiny MNIST data_dir: the engines' DataError comes back before anything runs
    runs_before = len(priced_cluster.runs())
    stdout, stderr = io.StringIO(), io.StringIO()
    code = main(
        ["--config", str(ini), "bench", "--workload", "cifar10-vgg16", "--engines", "1", "--epochs", "1"],
        stdout=stdout,
        stderr=stderr,
    )
    assert code == 1
    assert "could not load the cifar10-vgg16 data" in stderr.getvalue() and "no CIFAR-10 here" in stderr.getvalue()
    assert BenchTable(priced_cluster.store).records(workload="cifar10-vgg16") == []
    assert len(priced_cluster.runs()) == runs_before

"""Fixtures that start real components (ipyparallel controller and engines) and always tear them down; the
helpers they and the tests share are in tests/helpers.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from engines.data import write_synthetic_mnist
from tests.aws import free_port, fresh_ec2
from tests.helpers import running_cluster

# Seconds each file took in `make test` (4 workers on 2 cores). They only order the files: `make test` hands
# whole files to the workers in collection order (pytest-xdist, loadfile, no reordering), so the longest go
# first and the short ones fill in at the end instead of one long file running alone. A file not listed
# counts as short unless it brings up slave hosts; stale numbers cost balance, never a result.
FILE_SECONDS = {
    "test_adopt.py": 123,
    "test_cluster.py": 100,
    "test_provider_contract.py": 81,
    "test_ssh_provider.py": 66,
    "test_infer.py": 64,
    "test_sweep.py": 64,
    "test_aws_provider.py": 63,
    "test_distributed.py": 60,
    "test_security.py": 59,
    "test_elastic.py": 46,
    "test_forked_engines.py": 43,
    "test_paper.py": 43,
    "test_master_away.py": 40,
    "test_bench.py": 39,
    "test_training.py": 36,
    "test_short_tasks.py": 24,
    "test_keeper_revival.py": 16,
    "test_report.py": 15,
    "test_errors.py": 14,
    "test_optim.py": 12,
    "test_notebook.py": 10,
    "test_tunnels.py": 10,
    "test_notices.py": 9,
}


def expected_seconds(item) -> float:
    name = item.path.name
    if name in FILE_SECONDS:
        return FILE_SECONDS[name]
    return 60.0 if item.module is not None and hasattr(item.module, "NetnsHosts") else 1.0


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: -expected_seconds(item))  # stable: a file's tests keep their order


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread_in_process():
    """The torch work tests do in the pytest process runs on one thread: files run side by side, two per
    core, and a second thread's spin-waits on a busy machine cost more CPU than the work (test_optim: 40 s
    instead of 8 s). Engines have their own setting (threads_per_engine)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def no_outside_configuration():
    """Tests say where their config, data and state are; `make test` (or a user's shell) may have set
    these for the demo, and subprocesses would inherit them."""
    saved = {
        name: os.environ.pop(name)
        for name in ("CLUSTER_CONFIG", "CLUSTER_DATA_DIR", "CLUSTER_STATE_DIR")
        if name in os.environ
    }
    yield
    os.environ.update(saved)


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_as_under_a_terminal():
    """A shell starts a background job (`make test &`, a CI step run that way) with SIGINT ignored, and every
    process it starts inherits that: the tests that Ctrl-C a `cluster` process, or this one, would wait
    for an interrupt that never comes. SIGINT here as a terminal delivers it; children get the default."""
    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A small learnable MNIST-shaped data set (600 train images) in torchvision's layout."""
    return write_synthetic_mnist(tmp_path_factory.mktemp("tiny-mnist"), n_train=600, n_test=100)


@pytest.fixture
def isolated(tmp_path, monkeypatch, tiny_data_dir) -> Path:
    """A fresh cwd and state_dir, tiny data, and no cluster.ini from anywhere else."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLUSTER_CONFIG", raising=False)
    monkeypatch.setenv("CLUSTER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CLUSTER_DATA_DIR", str(tiny_data_dir))
    return tmp_path


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory, tiny_data_dir):
    """A real 2-engine local cluster on tiny data, shared by a module's tests."""
    with running_cluster(tmp_path_factory.mktemp("cluster"), tiny_data_dir) as cluster:
        yield cluster


# aws: moto's server, one per test module, and an empty EC2 for each test ------------------------------
@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def ec2(moto_url, monkeypatch):
    return fresh_ec2(moto_url, monkeypatch)

"""A local engine begins importing torch as soon as it starts, before the master asks it anything.

`cluster start` asks every engine who it is (engines.tasks.engine_info) once all have registered;
that first task used to import torch itself, so engines that registered early sat idle.  Now the
engine's startup command (engines/process/startup.py) starts the imports in a background thread, and a task
that needs torch waits for that thread instead of importing alongside it.
"""

from __future__ import annotations

import logging

import pytest

from controller.ipp.launch import new_cluster
from controller.ipp.profile import engine_args, engine_environment
from engines import tasks
from engines.data import Split
from engines.process import startup


@pytest.fixture
def one_engine(tmp_path):
    """One real engine started as `cluster start` starts local engines (our startup command), nothing asked yet."""
    profile = tmp_path / "profile"
    cluster = new_cluster(profile, "startup-test", engine_env=engine_environment(1))
    cluster.start_controller_sync()
    client = None
    try:
        cluster.start_engines_sync(n=1, engine_args=engine_args(1.0))
        client = cluster.connect_client_sync(timeout=60)
        client.wait_for_engines(1, timeout=90)
        yield client
    finally:
        if client is not None:
            client.close()
        cluster.stop_cluster_sync()


def test_the_engine_starts_importing_torch_before_it_is_asked_anything(one_engine):
    engine = one_engine[one_engine.ids[0]]
    # the first task the engine runs: the imports were started before it (by the startup command)
    assert engine.apply_sync(startup.preloaded)["started"], "the startup command did not start the imports"
    engine.apply_sync(startup.wait)
    # the thread, not a task, imported every module: the tasks above import none of them
    assert engine.apply_sync(startup.preloaded)["imported"] == list(startup.PRELOAD)
    info = engine.apply_sync(tasks.engine_info, 1)
    assert info["threads"] == 1 and info["device"] == "cpu"


class TestPreload:
    @pytest.fixture(autouse=True)
    def fresh(self, monkeypatch):
        """This process as a fresh engine: no preload started yet (the module keeps its thread)."""
        monkeypatch.setattr(startup, "_thread", None)
        monkeypatch.setattr(startup, "_imported", [])

    def test_a_module_that_fails_to_import_is_logged_and_the_rest_still_import(self, caplog):
        with caplog.at_level(logging.WARNING, logger="engines.process.startup"):
            assert startup.preload(("json", "engines_no_such_module", "csv"))
            startup.wait()
        assert startup.preloaded() == {"started": True, "imported": ["json", "csv"]}
        assert "could not import engines_no_such_module in advance" in caplog.text

    def test_it_starts_once_and_waiting_without_it_returns_at_once(self):
        startup.wait()  # a plain engine (no startup command): nothing to wait for
        assert startup.preloaded() == {"started": False, "imported": []}
        assert startup.preload(("json",)) is True
        assert startup.preload(("csv",)) is False
        startup.wait()
        assert startup.preloaded()["imported"] == ["json"]


@pytest.mark.parametrize(
    "size, batch, shapes",
    [
        (10_000, 1000, [1000]),  # MNIST's test split: every batch has one shape
        (5_500, 1000, [1000, 500]),  # a full batch and the last, partial one
        (800, 1000, [800]),  # smaller than one batch: all of it
    ],
)
def test_the_warm_up_evaluates_one_batch_of_each_shape_the_split_has(size, batch, shapes):
    import torch

    split = Split(torch.zeros(size, 28, 28, dtype=torch.uint8), torch.arange(size))
    sample = tasks._one_of_each_batch(split, batch)
    assert [len(sample.labels[i : i + batch]) for i in range(0, len(sample), batch)] == shapes
    assert torch.equal(sample.labels, split.labels[: len(sample)])

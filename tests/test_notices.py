"""Spot interruption notices: the engine's watcher reads IMDSv2 (a local server plays it, tests/imds.py),
and a notice makes the running task checkpoint at once and the run go on elsewhere, losing nothing."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from controller.api import Cluster
from controller.config import ConfigError, load_config, metadata_url
from engines.loop import load_checkpoint
from engines.process import notices, stopping
from engines.workloads.mnist import train_epochs
from tests.helpers import engines_holding_tasks, running_cluster, wait_until, write_ini
from tests.imds import REBALANCE, SPOT, FakeImds


@pytest.fixture(autouse=True)
def no_stop_request_left_behind():
    stopping.clear()
    yield
    notices.unwatch()
    stopping.clear()


@pytest.fixture
def imds():
    with FakeImds() as server:
        yield server


class TestTheWatcher:
    def test_no_notice_asks_nothing_and_every_read_carries_a_session_token(self, imds):
        assert notices.Watcher(imds.url).check() == []
        assert stopping.requested() is None
        served = imds.requests()
        assert [(s.path, s.status) for s in served] == [("/latest/api/token", 200), (SPOT, 404), (REBALANCE, 404)]

    @pytest.mark.parametrize("path,name", [(SPOT, "spot interruption notice"), (REBALANCE, "rebalance recommendation")])
    def test_a_notice_asks_the_running_task_to_stop_with_a_checkpoint(self, imds, path, name, caplog):
        watcher = notices.Watcher(imds.url)
        assert watcher.check() == []
        imds.announce(path)
        assert watcher.check() == [name]
        assert stopping.requested() == stopping.NOTICE
        assert name in caplog.text, "the log says which notice came"
        assert watcher.check() == [], "each notice is acted on once"

    def test_an_expired_token_is_renewed(self, imds):
        watcher = notices.Watcher(imds.url)
        watcher.check()
        imds.expire_tokens()
        imds.announce(SPOT)
        assert watcher.check() == ["spot interruption notice"]
        assert [s.path for s in imds.requests()].count("/latest/api/token") == 2

    def test_the_thread_polls_until_a_notice_comes_and_survives_a_service_that_is_down(self, imds):
        down = notices.Watcher("http://127.0.0.1:9", interval=0.05).start()  # nothing listens on port 9
        try:
            notices.watch(imds.url, interval=0.05)
            assert wait_until(lambda: len(imds.requests()) >= 5, timeout=30), "it polls"
            imds.announce(SPOT)
            assert wait_until(lambda: stopping.requested() == stopping.NOTICE, timeout=30)
            assert down.running, "an unreachable service is retried, not fatal"
        finally:
            down.stop()


class TestTheSetting:
    def test_aws_engines_watch_the_real_service_and_others_none_unless_told(self, tmp_path):
        default = load_config(write_ini(tmp_path / "a.ini", "[cluster]\n"), environ={}).cluster
        assert metadata_url(default, "aws") == "http://169.254.169.254"
        assert metadata_url(default, "local") == metadata_url(default, "ssh") == ""
        told = load_config(
            write_ini(tmp_path / "b.ini", "[cluster]\nmetadata_url = http://10.0.0.9:8080\n"), environ={}
        ).cluster
        assert metadata_url(told, "local") == "http://10.0.0.9:8080"
        off = load_config(write_ini(tmp_path / "c.ini", "[cluster]\nmetadata_url = off\n"), environ={}).cluster
        assert metadata_url(off, "aws") == ""

    def test_a_metadata_url_that_is_not_an_http_url_is_refused_naming_the_key(self, tmp_path):
        ini = write_ini(tmp_path / "bad.ini", "[cluster]\nmetadata_url = file:///etc/passwd\n")
        with pytest.raises(ConfigError, match=r"\[cluster\] metadata_url = 'file:///etc/passwd': expected .*http://"):
            load_config(ini, environ={})


def test_a_spot_notice_moves_the_running_task_to_another_engine_and_nothing_is_lost(tmp_path, tiny_data_dir, imds):
    holder = tmp_path / "holder-pid"
    with running_cluster(tmp_path, tiny_data_dir, extra=f"metadata_url = {imds.url}") as cluster:
        engines = {e.pid: e.engine_id for e in cluster.store.engines.of(cluster.record.id)}
        assert wait_until(lambda: all(imds.requests(pid) for pid in engines), timeout=30), "every engine watches"
        outcome: list = []

        def train() -> None:  # the master, as `cluster train` runs it
            with Cluster(cluster.config) as master:
                try:
                    outcome.append(master.train(epochs=2, subset=200, batch_size=50, task_seconds=1e-9))
                except BaseException as error:  # noqa: BLE001 - the test reports it
                    outcome.append(error)

        # the run's second task (one batch in) waits inside whichever engine took it; that engine is the victim
        when = f"checkpoint is not None and open({str(holder)!r}, 'w').write(str(os.getpid())) > 0"
        with engines_holding_tasks(cluster.client, tmp_path, when=when) as held:
            master = threading.Thread(target=train, daemon=True)
            master.start()
            assert held.wait(), "the run never reached its second task"
            victim_pid = int(holder.read_text())
            victim, survivor = engines[victim_pid], next(e for p, e in engines.items() if p != victim_pid)
            flipped = time.monotonic()
            imds.announce(SPOT, pid=victim_pid)
            # the watcher read the notice and polled again: the stop request is in before the task goes on
            assert wait_until(lambda: imds.read_and_polled_again(victim_pid), timeout=30)
            held.release()
            assert wait_until(
                lambda: cluster.store.engines.leaving(cluster.record.id) == {victim: "notice"}, timeout=60
            ), "the engine is marked as leaving"
            noticed_s = time.monotonic() - flipped
            master.join(timeout=180)
        assert not master.is_alive() and outcome and not isinstance(outcome[0], BaseException), outcome
        run = outcome[0].run
        assert run.state == "completed" and run.epochs_done == 2
        assert noticed_s < 30, f"the task came back {noticed_s:.1f} s after the notice"
        print(f"notice to task back on the master: {noticed_s:.2f} s")
        # the task the notice stopped went on elsewhere: every epoch was finished by the survivor
        assert [(e.epoch, e.engine_id) for e in cluster.store.epochs.of(run.id)] == [(1, survivor), (2, survivor)]
        params = {**run.params, "task_seconds": 0}
        whole = load_checkpoint(train_epochs(params).checkpoint)["model"]
        stored = load_checkpoint(cluster.store.checkpoints.load(run.id)[1])["model"]
        assert all(torch.equal(whole[k], stored[k]) for k in whole), "the same weights as an uninterrupted run"

"""Data-parallel training: one run on several real local engines with torch.distributed (gloo on CPU)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import ipyparallel as ipp
import pytest
import torch

from controller.errors import TaskError, UsageError
from controller.store import RunRecord, Store, new_id
from controller.work.distributed import DistributedRun, choose_engines, parse_engine_ids, rendezvous_address
from controller.work.jobs import Job, ProgressSink
from engines.ddp import RendezvousError, backend_for, free_port, train_ranked
from engines.tasks import distributed_task, rendezvous_port
from tests.fakes import FakeResult, TickingClock
from tests.helpers import real_mnist_dir, running_cluster, wait_until

DATA = real_mnist_dir()
needs_mnist = pytest.mark.skipif(DATA is None, reason="real MNIST is not in ../shared/data")
SMALL = {"subset": 2000, "batch_size": 100}


def test_the_backend_follows_the_device():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"  # only the decision: no GPU here


def test_ranks_on_one_host_meet_on_loopback_others_on_rank0s_address():
    port = {"address": "10.0.0.5", "port": 4321, "host": "a"}
    assert rendezvous_address(port, {0: "a", 1: "a"}, [0, 1]) == "127.0.0.1"
    assert rendezvous_address(port, {0: "a", 1: "b"}, [0, 1]) == "10.0.0.5"
    assert rendezvous_address(port, {0: "a", 1: "b"}, [0, 1], {0: "172.31.0.7"}) == "172.31.0.7"


def test_engine_ids_are_checked():
    assert parse_engine_ids("0,2") == [0, 2] and parse_engine_ids(None) is None
    for bad in ("x", "1,1", "-1"):
        with pytest.raises(UsageError, match="--engines"):
            parse_engine_ids(bad)
    assert choose_engines([0, 1, 2], None) == [0, 1, 2]
    with pytest.raises(UsageError, match="no engine 5"):
        choose_engines([0, 1], [5])


def test_rank_0s_port_is_free_and_below_the_range_outgoing_connections_take_their_ports_from():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        port = free_port()["port"]
        assert 0 < port < low
        with socket.socket() as sock:
            sock.bind(("", port))


def test_an_unreachable_rendezvous_fails_within_its_timeout_naming_address_and_port(tiny_data_dir):
    """Rank 1 finds nobody at rank 0's port; rank 0 (another port) waits for a rank 1 that never comes.
    3 s timeouts instead of the defaults (checked below to stay under 30 s) keep the test short."""
    from engines.ddp import COLLECTIVE_TIMEOUT_S, RENDEZVOUS_TIMEOUT_S

    assert RENDEZVOUS_TIMEOUT_S < 30 and COLLECTIVE_TIMEOUT_S < 30
    spec = {"data_dir": str(tiny_data_dir), "threads": 1, "epochs": 1}
    outcomes: dict[int, tuple[float, BaseException]] = {}

    def rank(number: int, port: int) -> None:
        started = time.monotonic()
        try:
            train_ranked(
                spec,
                None,
                1,
                {
                    "address": "127.0.0.1",
                    "port": port,
                    "rank": number,
                    "world": 2,
                    "rendezvous_timeout_s": 3.0,
                    "collective_timeout_s": 3.0,
                },
            )
        except BaseException as error:  # noqa: BLE001 - recorded and asserted below
            outcomes[number] = (time.monotonic() - started, error)

    ports = [free_port()["port"], free_port()["port"]]
    threads = [threading.Thread(target=rank, args=(n, ports[n])) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(outcomes) == {0, 1}, "both ranks must give up"
    for number in (0, 1):
        seconds, error = outcomes[number]
        assert isinstance(error, RendezvousError), error
        assert f"127.0.0.1:{ports[number]}" in str(error)
        assert 3 <= seconds < 15, f"rank {number} gave up after {seconds:.1f} s (timeout 3 s)"
    assert not torch.distributed.is_initialized(), "a failed rendezvous leaves no process group behind"


class ScriptedClock(TickingClock):
    """A second passes at each reading; ``at[t]`` runs when the clock reaches t; past 10,000 readings the test
    fails instead of running on for good."""

    def __init__(self):
        super().__init__()
        self.at: dict[int, list] = {}

    def __call__(self) -> float:
        now = super().__call__()
        assert now < 10_000, "the run never ended"
        for action in self.at.pop(int(now), []):
            action()
        return now


class HangingRanks:
    """A client for DistributedRun (a mock: a real rank cannot be made to hang in a CUDA kernel here).

    ``plan[engine]`` says what each of that engine's rank tasks does, one entry per attempt:
    - "hang": begins at once and never answers;
    - "fail": raises at once, as a rank whose collective timed out;
    - ("ok", t): begins at once and returns at second t;
    - ("queued", t): waits behind another task on its engine until second t, then hangs;
    - an int t: rank 0 begins at once, reports a new progress step every second up to t, then hangs.
    A SIGKILL ends a rank as the hub does when its engine dies, unless ``dies`` is False (its nanny is gone)."""

    def __init__(self, plan: dict[int, list], clock: ScriptedClock, dies: bool = True):
        self.plan, self.clock, self.dies = plan, clock, dies
        self.ids = sorted(plan)
        self.signalled: list[tuple[str, list[int]]] = []
        self.aborted: list[int] = []
        self.killed_at: dict[int, float] = {}
        self.running: dict[int, FakeResult] = {}

    def __getitem__(self, targets):
        return _RankView(self, targets)

    def send_signal(self, sig, targets=None, block=None):
        self.signalled.append((sig, list(targets)))
        for engine in targets:
            self.killed_at.setdefault(engine, self.clock.now)
            if self.dies:
                self.ids.remove(engine)
                self.running.pop(engine).set_exception(ipp.error.EngineError(f"engine {engine} died"))

    def abort(self, results):
        for engine, result in list(self.running.items()):
            if result in results:
                self.aborted.append(engine)


class _Began(dict):
    """A result's metadata: the engine id once the task began (ipyparallel learns it from the engine)."""

    def __init__(self, engine: int, clock: ScriptedClock, at: int):
        super().__init__()
        self.engine, self.clock, self.at = engine, clock, at

    def get(self, key, default=None):
        return self.engine if key == "engine_id" and self.clock.now >= self.at else default


class _RankView:
    def __init__(self, client: HangingRanks, targets):
        self.client, self.targets = client, targets

    def apply_async(self, task, *args):
        client, clock = self.client, self.client.clock
        result = FakeResult(f"m-{task.__name__}-{self.targets}")
        if task is socket.gethostname:
            result.set_result(["slave"] * len(self.targets))
            return result
        if task is rendezvous_port:
            result.set_result({"address": "127.0.0.1", "port": 1, "host": "slave"})
            return result
        assert task is distributed_task
        engine = self.targets
        what = client.plan[engine].pop(0)
        if what == "fail":
            result.set_exception(RuntimeError("the collective timed out"))
            return result
        began = what[1] if isinstance(what, tuple) and what[0] == "queued" else 0
        result.metadata = _Began(engine, clock, began)
        if isinstance(what, tuple) and what[0] == "ok":
            clock.at.setdefault(what[1], []).append(lambda: result.set_result({"rank": engine}))
        if isinstance(what, int):
            result.data = _Progress(clock, until=what)
        client.running[engine] = result
        return result


class _Progress(dict):
    """Rank 0's published data: a new step at every reading of the run's clock up to ``until``, then none."""

    def __init__(self, clock: ScriptedClock, until: int):
        super().__init__()
        self.clock, self.until = clock, until

    def get(self, key, default=None):
        return {"batch": min(self.clock.now, self.until)} if key == "progress" else default


class TestHungRanks:
    """A rank that hangs (a stuck CUDA kernel or NCCL call: its engine's heartbeat goes on) has its engine killed
    through the nanny, whether another rank failed first (after the grace) or every rank hangs (after
    [cluster] stall_minutes of no progress from rank 0, once it began)."""

    @staticmethod
    def run(tmp_path, plan, clock=None, dies=True, **options):
        clock = clock or ScriptedClock()
        client = HangingRanks(plan, clock, dies=dies)
        store = Store(tmp_path)
        spec = {"run_id": "r-ddp", "epochs": 1, "batch_size": 100}
        store.runs.create(RunRecord(id="r-ddp", params=spec))
        run = DistributedRun(client, store, sorted(plan), poll_s=0, clock=clock, **options)
        with pytest.raises(TaskError) as raised:
            run.run(Job(run_id="r-ddp", spec=spec))
        return client, run, raised.value, store

    def test_when_every_rank_hangs_their_engines_are_killed_after_stall_minutes_and_the_run_says_how_to_resume(
        self, tmp_path
    ):
        client, _, error, store = self.run(tmp_path, {0: ["hang"], 1: ["hang"]}, stall_s=60)
        assert client.signalled == [("SIGKILL", [0]), ("SIGKILL", [1])]
        assert 60 <= client.killed_at[0] <= 63
        assert "no progress for 1 min ([cluster] stall_minutes)" in str(error)
        assert "engines 0, 1 were stopped" in str(error) and "cluster train --resume r-ddp" in str(error)
        assert store.runs.get("r-ddp").state == "failed"

    def test_progress_from_rank_0_keeps_the_ranks_alive(self, tmp_path):
        client, _, _, _ = self.run(tmp_path, {0: [40], 1: ["hang"]}, stall_s=60)
        assert 100 <= client.killed_at[0] <= 103, "killed stall_s after the last progress, not after the start"

    def test_rank_0_queued_behind_another_task_is_not_silent_until_it_begins(self, tmp_path):
        client, _, _, _ = self.run(tmp_path, {0: [("queued", 50)], 1: ["hang"]}, stall_s=60)
        assert client.killed_at[0] >= 100, "its wait in the queue counted as silence"

    def test_rank_0_evaluating_after_the_others_returned_is_timed_from_their_return(self, tmp_path):
        client, run, error, _ = self.run(tmp_path, {0: ["hang"], 1: [("ok", 30), "hang"]}, stall_s=60)
        assert client.killed_at[0] >= 90, "the other ranks' return did not count as progress"
        assert [f["lost"] for f in run.failovers] == [[0]]
        assert "engines 0, 1 were stopped" in str(error), "every engine stopped for a stall is named"

    def test_a_pause_of_the_master_is_not_silence_of_the_ranks(self, tmp_path):
        class PausingClock(ScriptedClock):
            def __call__(self):
                if self.now == 30:
                    self.now += 3600  # the laptop slept an hour at the 30th reading
                return super().__call__()

        client, _, _, _ = self.run(tmp_path, {0: ["hang"], 1: ["hang"]}, clock=PausingClock(), stall_s=60)
        assert client.killed_at[0] >= 3600 + 60, "the hour asleep counted as the ranks' silence"

    def test_a_rank_silent_past_the_grace_after_another_failed_is_killed_and_the_epoch_goes_on_without_it(
        self, tmp_path
    ):
        client, run, error, _ = self.run(tmp_path, {0: ["hang", "x"], 1: ["fail", "hang"]}, grace_s=40, stall_s=600)
        assert client.signalled[0] == ("SIGKILL", [0]) and 40 <= client.killed_at[0] <= 43
        assert [f["lost"] for f in run.failovers] == [[0]], "the epoch went on, on engine 1 alone"
        assert client.signalled[1] == ("SIGKILL", [1]), "then engine 1 hung alone, past stall_minutes"
        assert "no progress for 10 min" in str(error)

    def test_after_a_failure_the_grace_not_stall_minutes_decides(self, tmp_path):
        client, run, _, _ = self.run(tmp_path, {0: ["hang", "x"], 1: ["fail", "hang"]}, grace_s=40, stall_s=15)
        assert client.killed_at[0] > 40 and run.stalled == [1], "a rank was stopped as stalled during the grace"

    def test_a_pause_of_the_master_does_not_use_up_the_grace(self, tmp_path):
        class PausingClock(ScriptedClock):
            def __call__(self):
                if self.now == 10:
                    self.now += 3600
                return super().__call__()

        client, _, _, _ = self.run(
            tmp_path, {0: ["hang", "x"], 1: ["fail", "hang"]}, clock=PausingClock(), grace_s=40, stall_s=600
        )
        assert client.killed_at[0] >= 3600 + 40

    def test_a_rank_still_queued_past_the_grace_is_withdrawn_not_killed(self, tmp_path):
        client, run, _, _ = self.run(tmp_path, {0: ["fail", "hang"], 1: [("queued", 9000)]}, grace_s=40, stall_s=600)
        assert client.aborted == [1] and ("SIGKILL", [1]) not in client.signalled
        assert [f["lost"] for f in run.failovers] == [[1]]

    def test_a_kill_that_never_arrives_still_ends_the_attempt_and_each_engine_is_signalled_once(self, tmp_path):
        client, _, error, _ = self.run(tmp_path, {0: ["hang"], 1: ["hang"]}, dies=False, stall_s=60)
        assert client.signalled == [("SIGKILL", [0]), ("SIGKILL", [1])]
        assert "engines 0, 1 were stopped" in str(error)

    def test_no_stall_limit_means_no_kill(self, tmp_path):
        class BoundedClock(ScriptedClock):
            def __call__(self):
                if self.now >= 5000:
                    raise TaskError("the test's clock ran out")
                return super().__call__()

        client, _, error, _ = self.run(tmp_path, {0: ["hang"], 1: ["hang"]}, clock=BoundedClock(), stall_s=0)
        assert client.signalled == [] and "clock ran out" in str(error)


def distributed_job(cluster, **overrides) -> Job:
    spec = cluster.run_spec(**overrides)
    spec["run_id"] = run_id = new_id("r-")
    cluster.store.runs.create(RunRecord(id=run_id, params=spec, cluster_id=cluster.record.id))
    return Job(run_id=run_id, spec=spec)


@pytest.fixture(scope="module")
def mnist_cluster(tmp_path_factory):
    if DATA is None:
        pytest.skip("real MNIST is not in ../shared/data")
    with running_cluster(tmp_path_factory.mktemp("ddp"), DATA) as cluster:
        yield cluster


@needs_mnist
def test_two_engines_match_one_engine_at_the_same_global_batch(mnist_cluster):
    single = mnist_cluster.train(epochs=1, **SMALL).run
    job = distributed_job(mnist_cluster, epochs=1, **SMALL)
    run = DistributedRun(mnist_cluster.client, mnist_cluster.store, [0, 1])
    run.run(job)
    stored = mnist_cluster.store.runs.get(job.run_id)
    assert stored.state == "completed" and stored.epochs_done == 1
    assert abs(stored.test_accuracy - single.test_accuracy) <= 0.005, (stored.test_accuracy, single.test_accuracy)
    assert len(run.weights) == 2 and len(set(run.weights.values())) == 1, "both ranks hold identical weights"
    assert stored.params["distributed"]["engines"] == [0, 1]
    assert stored.params["distributed"]["global_batch"] == 100


@needs_mnist
def test_a_cifar_model_trains_data_parallel_too(mnist_cluster, tmp_path):
    from engines.workloads.cifar import write_cifar10_batches

    cifar = write_cifar10_batches(tmp_path, per_batch=8, n_test=16)
    spec = {"model": "resnet18", "data_dir": str(cifar), "epochs": 1, "batch_size": 12, "threads": 1}
    spec["run_id"] = run_id = new_id("r-")
    mnist_cluster.store.runs.create(RunRecord(id=run_id, params=spec, cluster_id=mnist_cluster.record.id))
    run = DistributedRun(mnist_cluster.client, mnist_cluster.store, [0, 1])
    run.run(Job(run_id=run_id, spec=spec))
    stored = mnist_cluster.store.runs.get(run_id)
    assert stored.state == "completed" and stored.test_accuracy is not None
    assert len(set(run.weights.values())) == 1


class InterruptAfterFirstEpoch(ProgressSink):
    def task_done(self, job, result, engine_id):
        raise KeyboardInterrupt


@needs_mnist
def test_a_distributed_run_resumes_distributed_on_another_engine_count(mnist_cluster):
    single = mnist_cluster.train(epochs=2, **SMALL).run
    with pytest.raises(KeyboardInterrupt):
        mnist_cluster.train(distributed=True, epochs=2, progress=InterruptAfterFirstEpoch(), **SMALL)
    run_id = mnist_cluster.current_run_id
    interrupted = mnist_cluster.store.runs.get(run_id)
    assert interrupted.state == "interrupted" and interrupted.epochs_done == 1
    assert interrupted.params["distributed"]["engines"] == [0, 1]
    resumed = mnist_cluster.resume(run_id, engines=[1]).run
    assert resumed.state == "completed" and resumed.epochs_done == 2
    assert resumed.params["distributed"]["engines"] == [1] and resumed.params["distributed"]["global_batch"] == 100
    assert abs(resumed.test_accuracy - single.test_accuracy) <= 0.005


def test_killing_one_of_three_engines_mid_epoch_completes_the_run_on_two(tmp_path, tiny_data_dir):
    """Every rank waits at step 3 of epoch 2; the engine of rank 0 (which serves the rendezvous) is killed
    there, the others go on into their all-reduce with a dead peer, and the epoch runs again on two."""
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    (tmp_path / "c").mkdir()
    with running_cluster(tmp_path / "c", tiny_data_dir, slaves=3) as cluster:
        job = distributed_job(cluster, epochs=3, batch_size=60)
        killed: list[int] = []

        def kill_rank0_at_the_hold() -> None:
            ready = wait_until(lambda: len(list(hold_dir.glob("rank-*.ready"))) == 3, timeout=120)
            if ready:
                pid = int((hold_dir / "rank-0.ready").read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            (hold_dir / "go").write_text("")

        killer = threading.Thread(target=kill_rank0_at_the_hold)
        killer.start()
        try:
            run = DistributedRun(
                cluster.client, cluster.store, [0, 1, 2], hold={"epoch": 2, "step": 3, "dir": str(hold_dir)}
            )
            run.run(job)
        finally:
            (hold_dir / "go").write_text("")
            killer.join(130)
        assert killed, "the ranks never reached the hold"
        stored = cluster.store.runs.get(job.run_id)
        assert stored.state == "completed" and stored.epochs_done == 3
        assert [f["lost"] for f in run.failovers] == [[0]] and run.failovers[0]["epoch"] == 2
        assert stored.params["distributed"]["engines"] == [1, 2]
        assert [e.epoch for e in cluster.store.epochs.of(job.run_id)] == [1, 2, 3]
        assert len(set(run.weights.values())) == 1 and set(run.weights) == {1, 2}


@needs_mnist
def test_cluster_train_distributed_prints_the_run_with_its_engines(mnist_cluster):
    import io
    import json

    from controller.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(["--config", mnist_cluster.config.source, *argv], stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    code, out, err = run(
        "train",
        "--distributed",
        "--engines",
        "1,0",
        "--epochs",
        "1",
        "--subset",
        "1000",
        "--batch-size",
        "100",
        "--json",
    )
    assert code == 0, err
    record = json.loads(out)
    assert record["state"] == "completed" and record["params"]["distributed"]["engines"] == [1, 0]
    assert record["engine_id"] == 1, "rank 0 (the first engine given) reports the run"
    code, _, err = run("train", "--engines", "0")
    assert code == 2 and "add --distributed" in err
    code, _, err = run("train", "--distributed", "--engines", "0,7")
    assert code == 2 and "no engine 7" in err

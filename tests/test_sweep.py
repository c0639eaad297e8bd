"""Sweeps: --param parsing, and real sweeps with real Optuna on a real 2-engine local cluster."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import ipyparallel as ipp
import optuna
import pytest

from controller import cli
from controller.errors import UsageError
from controller.store import Store
from controller.work.jobs import ProgressSink
from controller.work.sweep import build_space, parse_param
from controller.work.sweep.runner import plan
from controller.work.sweep.space import ACCEPTED_FORMS
from tests.helpers import REPO, cluster_pids, engines_holding_tasks, make_config, master_restarts


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# --param specs: no cluster needed ------------------------------------------------------


def test_param_forms():
    assert parse_param("lr=0.01,0.05").values == (0.01, 0.05)
    assert parse_param("optimizer=adam,sgd").values == ("adam", "sgd")
    lr = parse_param("lr=log:1e-3:1e-1")
    assert (lr.low, lr.high, lr.log, lr.integer) == (1e-3, 1e-1, True, False)
    hidden = parse_param("hidden=int:50:500")
    assert (hidden.low, hidden.high, hidden.integer) == (50, 500, True)
    assert parse_param("momentum=uniform:0.5:0.99").is_range
    assert parse_param("batch-size=64,128").name == "batch_size"
    space = build_space({"lr": [0.01, 0.05], "hidden": "int:50:500"})
    assert space.names == ["lr", "hidden"] and not space.is_grid
    assert build_space(["l1=0,1e-5", "conv1=10,20"]).grid_size() == 4


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("lr=log:1e-3", "two bounds"),
        ("lr=int:1:5", "real-valued"),
        ("bogus=1,2", "cannot be swept"),
        ("lr", "expected NAME=FORM"),
        ("l1=log:0:1", "LO > 0"),
        ("optimizer=adam,rmsprop", "expected one of adam, sgd"),
        ("lr=0.1,abc", "expected a number"),
        ("hidden=int:500:50", "LO must be below HI"),
        ("batch_size=0,64", "out of range"),
        ("lr=0.1,0.1", "listed twice"),
    ],
)
def test_bad_param_is_named_with_the_accepted_forms(spec, reason):
    with pytest.raises(UsageError) as caught:
        parse_param(spec)
    message = str(caught.value)
    assert f"--param {spec!r}" in message and reason in message and ACCEPTED_FORMS in message


def test_plan_checks_sampler_and_defaults():
    space, sampler, trials = plan(["l1=0,1e-5,1e-4", "lr=0.01,0.05"])
    assert (sampler, trials) == ("grid", 6)
    assert plan(["lr=log:1e-3:1e-1"])[1:] == ("tpe", 20)
    space, sampler, trials = plan(preset="paper")
    assert sampler == "grid" and trials == 9 and space.grid()["l1"][-1] == 100.0
    with pytest.raises(UsageError, match="lr=log:0.001:0.1 is a range"):
        plan(["lr=log:1e-3:1e-1"], sampler="grid")
    with pytest.raises(UsageError, match="needs something to vary"):
        plan([])
    with pytest.raises(UsageError, match="both swept"):
        plan(["epochs=1,2"], overrides={"epochs": 3})


def test_bad_param_on_the_cli_exits_2_and_starts_nothing(isolated):
    code, out, err = run_cli("sweep", "--param", "lr=log:1e-3", "--epochs", "1")
    assert code == 2
    assert "--param 'lr=log:1e-3'" in err and "NAME=log:LO:HI" in err and "NAME=V1,V2" in err
    assert out == ""
    assert not cluster_pids(isolated / "state")
    with Store(isolated / "state") as store:
        assert store.clusters.all() == [] and store.runs.all() == []
    assert not (isolated / "state" / "sweeps.db").exists()


# real sweeps on the module's 2-engine cluster ----------------------------------------------


def grid_order(values: list, seed: int) -> list:
    """The order in which Optuna's GridSampler hands out a one-parameter grid (public API only)."""
    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"lr": values}, seed=seed))
    return [study.ask().suggest_categorical("lr", values) for _ in values]


def test_grid_4_trials_2_epochs_on_2_engines(local_cluster):
    result = local_cluster.sweep({"lr": [0.005, 0.01], "hidden": [32, 64]}, epochs=2)
    assert [t.state for t in result.trials] == ["COMPLETE"] * 4
    assert sorted((t.params["lr"], t.params["hidden"]) for t in result.trials) == [
        (0.005, 32),
        (0.005, 64),
        (0.01, 32),
        (0.01, 64),
    ]
    runs = local_cluster.runs(sweep_id=result.sweep_id)
    assert len(runs) == 4 and all(r.state == "completed" and r.epochs_done == 2 for r in runs)
    for run in runs:
        epochs = local_cluster.store.epochs.of(run.id)
        assert [e.epoch for e in epochs] == [1, 2] and all(e.engine_id is not None for e in epochs)
        assert run.seconds > 0 and run.trial_number is not None
    # load-balanced: both engines trained
    assert len({e for t in result.trials for e in t.engines}) == 2
    vals = [t.val_accuracy for t in result.trials]
    assert vals == sorted(vals, reverse=True)
    assert result.best.number == result.trials[0].number and result.best.test_accuracy is not None
    assert result.dispatch_overheads and result.makespan_s > 0

    config = str(local_cluster.config.source)
    code, out, err = run_cli("--config", config, "results", result.sweep_id, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["sweep_id"] == result.sweep_id and len(data["trials"]) == 4
    assert {t["state"] for t in data["trials"]} == {"COMPLETE"}
    assert set(data["trials"][0]) >= {
        "number",
        "params",
        "state",
        "value",
        "val_accuracy",
        "test_accuracy",
        "epochs",
        "engine_id",
        "seconds",
    }
    assert data["best"]["number"] == data["trials"][0]["number"]
    assert data["best"]["value"] == pytest.approx(data["best"]["val_accuracy"])
    code, out, err = run_cli("--config", config, "sweeps", "--json")
    assert code == 0 and result.sweep_id in [s["sweep_id"] for s in json.loads(out)["sweeps"]]
    code, out, err = run_cli("--config", config, "results", result.sweep_id)
    assert code == 0 and "best: trial" in out


def test_median_pruner_prunes_a_diverging_trial(local_cluster):
    values = [0.005, 0.01, 0.02, 10.0]
    # the diverging trial must start after the first ones, so the pruner has completed trials to compare
    # (the sweep keeps one task queued beyond the 2 engines, so 3 trials start at once: the 4th starts
    # only once a trial finished)
    seed = next(s for s in range(100) if grid_order(values, s).index(10.0) == 3)
    result = local_cluster.sweep({"lr": values}, epochs=3, pruner="median", seed=seed)
    by_lr = {t.params["lr"]: t for t in result.trials}
    assert by_lr[10.0].state == "PRUNED", [(t.params, t.state, t.epochs) for t in result.trials]
    assert by_lr[10.0].epochs_done < 3 or by_lr[10.0].val_accuracy < 0.5
    assert local_cluster.store.runs.get(by_lr[10.0].run_id).state == "pruned"
    assert result.counts()["COMPLETE"] >= 1 and result.counts()["FAIL"] == 0


@ipp.interactive  # shipped by value: the engines cannot import this test module
def cursed_task(spec, checkpoint, n_epochs):
    if spec["hidden"] == 13:
        raise RuntimeError("hidden=13 is cursed")
    from engines.tasks import train_task

    return train_task(spec, checkpoint, n_epochs)


def test_a_trial_that_raises_is_failed_with_its_traceback_and_the_sweep_goes_on(local_cluster):
    result = local_cluster.sweep({"hidden": [13, 32, 64]}, epochs=1, task=cursed_task)
    states = {t.params["hidden"]: t.state for t in result.trials}
    assert states == {13: "FAIL", 32: "COMPLETE", 64: "COMPLETE"}
    failed = next(t for t in result.trials if t.state == "FAIL")
    assert "hidden=13 is cursed" in failed.error and "RuntimeError" in failed.error
    assert "hidden=13 is cursed" in local_cluster.store.runs.get(failed.run_id).error
    assert result.trials[-1] is failed  # failed trials rank last


def test_a_sweep_cut_by_a_master_restart_resumes_once_start_has_adopted_the_cluster(tmp_path, tiny_data_dir):
    """The whole master goes down mid-sweep (the sweep command, the controller, the local engines). `cluster
    start` takes the same cluster record up again, and `sweep --resume` finishes the sweep on it."""
    from controller.api import Cluster

    cluster = Cluster(make_config(tmp_path, tiny_data_dir, slaves=2))
    config = str(cluster.config.source)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        first = cluster.start()
        store = cluster.store
        # the master restarts at a fixed point: a trial's second epoch is about to start (its first is stored)
        with engines_holding_tasks(cluster.client, tmp_path, when="checkpoint is not None") as held:
            master = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "controller",
                    "--config",
                    config,
                    "sweep",
                    "--param",
                    "lr=0.003,0.005,0.01",
                    "--epochs",
                    "2",
                    "--json",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            assert held.wait(process=master), master.stderr.read().decode() if master.poll() is not None else "slow"
            master_restarts(cluster, master)
        (sweep_id,) = {r.sweep_id for r in store.runs.all() if r.sweep_id}

        code, _out, err = run_cli("--config", config, "start")
        assert code == 0 and "restarted the engines of cluster 'test'" in err, err
        assert cluster.status().cluster_id == first.cluster_id  # the same record: the sweep's runs stay with it

        resumed = subprocess.run(
            [sys.executable, "-m", "controller", "--config", config, "sweep", "--resume", sweep_id, "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
        )
        assert resumed.returncode == 0, resumed.stderr
        data = json.loads(resumed.stdout)
        assert data["state"] == "completed"
        assert sorted(t["params"]["lr"] for t in data["trials"]) == [0.003, 0.005, 0.01]
        assert {t["state"] for t in data["trials"]} == {"COMPLETE"}
        assert all(r.state == "completed" and r.epochs_done == 2 for r in store.runs.all(sweep_id=sweep_id))
    finally:
        cluster.stop()
        cluster.close()


def test_kill_the_master_mid_sweep_then_resume(local_cluster, tmp_path):
    config = str(local_cluster.config.source)
    store = local_cluster.store
    cmd = [
        sys.executable,
        "-m",
        "controller",
        "--config",
        config,
        "sweep",
        "--param",
        "lr=0.003,0.005,0.01",
        "--param",
        "hidden=32,64",
        "--epochs",
        "5",
        "--json",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = {r.id for r in store.runs.all()}

    def sweep_runs():
        return [r for r in store.runs.all() if r.id not in before and r.sweep_id]

    # SIGKILL at a fixed point: two trials completed, and the engines hold every task that starts after that
    # (so at least one trial, of the four left with five epochs each, is unfinished when the master dies)
    completed_elsewhere = f"""
import contextlib, sqlite3
def _completed_trials():
    with contextlib.closing(sqlite3.connect({str(store.path)!r})) as db:
        rows = db.execute("SELECT id FROM runs WHERE sweep_id IS NOT NULL AND state = 'completed'").fetchall()
    return sum(1 for (run_id,) in rows if run_id not in {sorted(before)!r})
"""
    with engines_holding_tasks(
        local_cluster.client, tmp_path, when="_completed_trials() >= 2", helpers=completed_elsewhere
    ) as held:
        master = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            assert held.wait(), master.stderr.read1().decode() if master.poll() is not None else "slow"
            master.send_signal(signal.SIGKILL)
            master.wait(timeout=10)
        finally:
            if master.poll() is None:
                master.kill()
                master.wait()
    runs = sweep_runs()
    sweep_id = runs[0].sweep_id
    finished = {r.id: (r.finished_at, r.seconds) for r in runs if r.state == "completed"}
    assert 2 <= len(finished) < 6, "the sweep ended before it could be killed"
    epochs_before = {rid: [(e.epoch, e.finished_at) for e in store.epochs.of(rid)] for rid in finished}

    code, out, err = run_cli("--config", config, "sweeps", "--json")
    shown = next(s for s in json.loads(out)["sweeps"] if s["sweep_id"] == sweep_id)
    assert shown["state"] == "interrupted"

    resumed = subprocess.run(
        [sys.executable, "-m", "controller", "--config", config, "sweep", "--resume", sweep_id, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr
    data = json.loads(resumed.stdout)
    assert data["sweep_id"] == sweep_id and data["state"] == "completed"
    assert len(data["trials"]) == 6 and {t["state"] for t in data["trials"]} == {"COMPLETE"}
    assert sorted((t["params"]["lr"], t["params"]["hidden"]) for t in data["trials"]) == sorted(
        (lr, h) for lr in (0.003, 0.005, 0.01) for h in (32, 64)
    )
    runs = [r for r in store.runs.all(sweep_id=sweep_id)]
    assert len(runs) == 6 and all(r.state == "completed" and r.epochs_done == 5 for r in runs)
    for rid, (finished_at, seconds) in finished.items():  # finished trials were not trained again
        run = store.runs.get(rid)
        assert (run.finished_at, run.seconds) == (finished_at, seconds)
        assert [(e.epoch, e.finished_at) for e in store.epochs.of(rid)] == epochs_before[rid]
    code, out, err = run_cli("--config", config, "sweep", "--resume", sweep_id)
    assert code == 2 and "already completed" in err


def test_ctrl_c_leaves_the_sweep_resumable(local_cluster, tmp_path):
    config = str(local_cluster.config.source)
    store = local_cluster.store
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = {r.id for r in store.runs.all()}
    # Ctrl-C at a fixed point: a trial's second task has started on an engine (its first epoch is stored)
    with engines_holding_tasks(local_cluster.client, tmp_path, when="checkpoint is not None") as held:
        master = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controller",
                "--config",
                config,
                "sweep",
                "--param",
                "hidden=16,32,48",
                "--epochs",
                "4",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert held.wait()
            master.send_signal(signal.SIGINT)
            out, err = master.communicate(timeout=60)
        finally:
            if master.poll() is None:
                master.kill()
                master.wait()
    runs = [r for r in store.runs.all() if r.id not in before]
    sweep_id = runs[0].sweep_id
    assert master.returncode == 130, err
    assert f"cluster sweep --resume {sweep_id}" in err
    assert any(r.state == "interrupted" for r in runs)
    assert local_cluster.results(sweep_id).sweep.state == "interrupted"

    result = local_cluster.sweep(resume=sweep_id)
    assert result.sweep.state == "completed" and [t.state for t in result.trials] == ["COMPLETE"] * 3
    assert all(r.state == "completed" and r.epochs_done == 4 for r in store.runs.all(sweep_id=sweep_id))


class _InterruptAfterFirstTask(ProgressSink):
    """A progress sink that stops the master (as Ctrl-C would) once the first task came back and was stored."""

    came_back = False

    def task_done(self, job, result, engine_id) -> None:
        self.came_back = True

    def tick(self) -> None:  # after the scheduler handed the result to the sweep
        if self.came_back:
            raise KeyboardInterrupt


def test_resume_trains_the_sweeps_own_base_spec_and_reports_an_edited_config(local_cluster, caplog):
    import dataclasses

    from controller.api import Cluster

    grid = {"hidden": [16, 24, 32, 48]}  # 2 engines + 1 prefetched task: the 4th trial is asked after resume
    with pytest.raises(KeyboardInterrupt):
        local_cluster.sweep(grid, epochs=1, subset=100, progress=lambda source: _InterruptAfterFirstTask())
    sweep_id = local_cluster.sweeps(limit=1)[0].sweep_id
    asked_before = {r.id for r in local_cluster.store.runs.all(sweep_id=sweep_id)}
    assert len(asked_before) < 4

    training = dataclasses.replace(local_cluster.config.training, lr=0.05, batch_size=64)  # edited in between
    edited = Cluster(dataclasses.replace(local_cluster.config, training=training))
    try:
        with caplog.at_level("WARNING", logger="controller.work.sweep.runner"):
            result = edited.sweep(resume=sweep_id)
    finally:
        edited.close()
    assert [t.state for t in result.trials] == ["COMPLETE"] * 4
    runs = local_cluster.store.runs.all(sweep_id=sweep_id)
    assert set(asked_before) < {r.id for r in runs}
    assert {(r.params["lr"], r.params["batch_size"], r.params["subset"]) for r in runs} == {(0.01, 128, 100)}
    warning = next(r.getMessage() for r in caplog.records if "differs from the sweep's" in r.getMessage())
    assert "batch_size = 128, now 64" in warning and "lr = 0.01, now 0.05" in warning


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_trial_whose_checkpoint_is_lost_restarts_and_the_resumed_sweep_goes_on(local_cluster, damage):
    with pytest.raises(KeyboardInterrupt):
        local_cluster.sweep(
            {"hidden": [16, 32]}, epochs=2, subset=100, progress=lambda source: _InterruptAfterFirstTask()
        )
    sweep_id = local_cluster.sweeps(limit=1)[0].sweep_id
    store = local_cluster.store
    # both engines' first tasks may come back in one round of the scheduler before the interrupt: the first
    # trial with an epoch stored is the one whose checkpoint goes
    damaged = min((r for r in store.runs.all(sweep_id=sweep_id) if r.epochs_done == 1), key=lambda r: r.id)
    path = next((store.checkpoints.folder / damaged.id).glob("epoch-*.pt"))
    path.unlink() if damage == "missing" else path.write_bytes(b"garbage")
    first_epoch_at = store.epochs.of(damaged.id)[0].finished_at

    result = local_cluster.sweep(resume=sweep_id)
    assert [t.state for t in result.trials] == ["COMPLETE"] * 2
    run = store.runs.get(damaged.id)
    assert run.state == "completed" and run.epochs_done == 2
    epochs = store.epochs.of(damaged.id)
    assert [e.epoch for e in epochs] == [1, 2] and epochs[0].finished_at > first_epoch_at  # trained again


def test_a_pruned_trial_is_stored_before_optuna_is_told(tmp_path):
    """If the master dies between the two writes, the store must not say 'running' for a trial Optuna pruned."""
    from optuna.trial import TrialState

    from controller.store import RunRecord
    from controller.work.jobs import Job
    from controller.work.sweep.source import SweepSource
    from controller.work.sweep.space import SearchSpace

    store = Store(tmp_path)
    study = optuna.create_study(direction="maximize")
    source = SweepSource(study, store, "s-1", SearchSpace(), {}, n_trials=1)
    trial = study.ask()
    store.runs.create(RunRecord(id="s-1-t000", params={}, sweep_id="s-1", trial_number=0))

    def master_dies(*args, **kwargs):
        raise KeyboardInterrupt

    study.tell = master_dies
    with pytest.raises(KeyboardInterrupt):
        source.finish(Job(run_id="s-1-t000", spec={}, tag=trial), TrialState.PRUNED, store.runs.get("s-1-t000"))
    assert store.runs.get("s-1-t000").state == "pruned"


def test_a_lost_engine_costs_one_task_that_goes_to_another_engine(local_cluster, tmp_path):
    """Last in this module: it leaves the cluster with one engine."""
    import threading

    victim = local_cluster.store.engines.of(local_cluster.record.id)[0]
    killed_at: list[float] = []

    def kill_when_training(held) -> None:
        if held.wait():  # the victim is inside a trial's task, from that trial's checkpoint
            os.kill(victim.pid, signal.SIGKILL)
            killed_at.append(time.time())

    with engines_holding_tasks(
        local_cluster.client, tmp_path, when="checkpoint is not None", targets=[victim.engine_id]
    ) as held:
        killer = threading.Thread(target=kill_when_training, args=(held,), daemon=True)
        killer.start()
        result = local_cluster.sweep({"hidden": [16, 32, 48, 64]}, epochs=6)
        killer.join(timeout=10)
    assert killed_at, "the victim never held a task"
    assert [t.state for t in result.trials] == ["COMPLETE"] * 4
    assert result.engine_losses >= 1
    for trial in result.trials:
        assert [e["epoch"] for e in trial.epochs] == list(range(1, 7))
    later = [
        e for t in result.trials for e in local_cluster.store.epochs.of(t.run_id) if e.finished_at > killed_at[0] + 1.0
    ]
    assert later and all(e.engine_id != victim.engine_id for e in later)  # the survivor did the rest

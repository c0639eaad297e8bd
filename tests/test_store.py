"""The SQLite store: runs, epochs and atomic, verified checkpoints."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from controller.errors import ClusterStateError
from controller.store import CheckpointError, EngineRecord, EpochRecord, NodeRecord, RunRecord, Store, schema
from controller.work.sweep.records import SweepTable


def test_runs_and_their_epochs_round_trip(tmp_path):
    store = Store(tmp_path)
    store.runs.create(RunRecord(id="r-1", params={"lr": 0.1, "epochs": 2}))
    store.epochs.add(
        EpochRecord(
            run_id="r-1",
            epoch=1,
            train_loss=0.5,
            val_accuracy=0.9,
            test_accuracy=0.91,
            seconds=2.0,
            train_seconds=1.5,
            images_per_s=100.0,
            lr=0.1,
        )
    )
    store.runs.update("r-1", state="completed", test_accuracy=0.91)
    again = Store(tmp_path)  # a second process sees committed writes
    run = again.runs.get("r-1")
    assert run.params == {"lr": 0.1, "epochs": 2} and run.state == "completed"
    assert [e.epoch for e in again.epochs.of("r-1")] == [1]
    with pytest.raises(ValueError, match="run state 'done'"):
        store.runs.update("r-1", state="done")


def test_state_dir_is_private(tmp_path):
    Store(tmp_path / "state")
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


def test_checkpoints_are_atomic_and_only_the_newest_is_kept(tmp_path):
    store = Store(tmp_path)
    store.runs.create(RunRecord(id="r-1", params={}))
    first = store.checkpoints.save("r-1", 1, b"one")
    second = store.checkpoints.save("r-1", 2, b"two")
    assert not first.exists() and second.read_bytes() == b"two"
    assert not list(second.parent.glob("*.tmp"))
    assert store.checkpoints.load("r-1") == (2, b"two")
    assert store.checkpoints.load("r-unknown") is None


def test_a_corrupt_checkpoint_is_detected(tmp_path):
    store = Store(tmp_path)
    store.runs.create(RunRecord(id="r-1", params={}))
    path = store.checkpoints.save("r-1", 1, b"good bytes")
    path.write_bytes(b"bad bytes!")
    with pytest.raises(CheckpointError, match="corrupt"):
        store.checkpoints.load("r-1")


def test_a_transaction_commits_everything_or_nothing(tmp_path):
    store = Store(tmp_path)
    store.runs.create(RunRecord(id="r-1", params={}))
    store.checkpoints.save("r-1", 1, b"one")
    with pytest.raises(KeyboardInterrupt):
        with store.transaction():
            store.epochs.add(
                EpochRecord(
                    run_id="r-1",
                    epoch=2,
                    train_loss=0.1,
                    val_accuracy=0.9,
                    test_accuracy=0.9,
                    seconds=1,
                    train_seconds=1,
                    images_per_s=1,
                    lr=0.1,
                )
            )
            store.checkpoints.save("r-1", 2, b"two")
            store.runs.update("r-1", epochs_done=2)
            raise KeyboardInterrupt  # Ctrl-C between the writes
    assert store.epochs.of("r-1") == [] and store.runs.get("r-1").epochs_done == 0
    assert store.checkpoints.load("r-1") == (1, b"one"), "the checkpoint the rows name is still there"


def test_the_checkpoint_rename_is_made_durable_before_the_older_file_is_deleted(tmp_path, monkeypatch):
    """After a power cut the store must never name a file whose rename was lost while the older is gone."""
    import os
    import stat

    store = Store(tmp_path)
    store.runs.create(RunRecord(id="r-1", params={}))
    first = store.checkpoints.save("r-1", 1, b"one")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink

    def fsync(fd):
        events.append(("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file", ""))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst, **kw)

    def unlink(path, **kw):
        events.append(("unlink", os.path.basename(path)))
        return real_unlink(path, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    store.checkpoints.save("r-1", 2, b"two")
    monkeypatch.undo()
    assert not first.exists()
    order = [name for name, _ in events]
    assert order.index("fsync-file") < order.index("replace") < order.index("fsync-dir") < order.index("unlink")
    assert ("unlink", first.name) in events


class TestTheSchemaOverTime:
    """A state_dir outlives the code that wrote it: opening it migrates it and keeps what it holds."""

    OLD_STORE = Path(__file__).parent / "fixtures" / "state_dir_before_schema_versions.sql"

    def test_a_state_dir_written_before_schema_versions_keeps_its_runs_and_sweeps(self, tmp_path):
        with sqlite3.connect(tmp_path / "cluster.db") as db:
            db.executescript(self.OLD_STORE.read_text())
        store = Store(tmp_path)
        assert schema.version(store.db) == schema.LATEST
        run = store.runs.get("r-old00001")
        assert run.state == "completed" and run.params["lr"] == 0.01
        assert [e.epoch for e in store.epochs.of("r-old00001")] == [1, 2]
        sweep = SweepTable(store).get("s-old00001")
        assert sweep.state == "completed" and sweep.base_spec == {}
        assert [r.id for r in store.runs.all(sweep_id="s-old00001")] == ["r-old00002"]
        # the tables and columns of later versions work on it
        store.engines.put(1, [EngineRecord(engine_id=0, host="h", pid=1, device="cpu", threads=1)])
        store.engines.mark_leaving(1, 0, "drain")
        assert store.engines.leaving(1) == {0: "drain"}
        assert [row[0] for row in store.execute("SELECT COUNT(*) FROM bench_measurements")] == [0]

    def test_a_new_store_is_at_the_latest_version_and_reopening_applies_nothing(self, tmp_path):
        Store(tmp_path).close()
        with sqlite3.connect(tmp_path / "cluster.db") as db:
            assert schema.migrate(db) == []
            assert schema.version(db) == schema.LATEST

    def test_a_state_dir_from_a_newer_version_is_refused_and_left_alone(self, tmp_path):
        Store(tmp_path).close()
        with sqlite3.connect(tmp_path / "cluster.db") as db:
            db.execute(f"PRAGMA user_version = {schema.LATEST + 1}")
        with pytest.raises(
            ClusterStateError,
            match=rf"cluster\.db: written by a newer version \(schema "
            rf"{schema.LATEST + 1}; this version knows {schema.LATEST}\)",
        ):
            Store(tmp_path)
        with sqlite3.connect(tmp_path / "cluster.db") as db:
            assert schema.version(db) == schema.LATEST + 1


class TestClusterTables:
    """Clusters, their engines and nodes, resize events and demand: one small table class each."""

    def test_the_active_cluster_is_the_newest_not_stopped_and_stopping_stamps_the_time(self, tmp_path):
        store = Store(tmp_path)
        first = store.clusters.create(
            name="c", provider="local", slaves=1, threads_per_engine=1, profile_dir="p", ipp_cluster_id="c-1"
        )
        store.clusters.set_state(first.id, "stopped", error="start failed: x")
        assert store.clusters.active("c") is None
        assert store.clusters.latest("c").error == "start failed: x" and store.clusters.latest("c").stopped_at
        second = store.clusters.create(
            name="c", provider="local", slaves=2, threads_per_engine=1, profile_dir="p", ipp_cluster_id="c-2"
        )
        store.clusters.update(second.id, target=3)
        assert store.clusters.active("c").id == second.id and store.clusters.get(second.id).target == 3
        assert [c.id for c in store.clusters.all()] == [first.id, second.id]
        with pytest.raises(KeyError, match="no cluster 99"):
            store.clusters.get(99)

    def test_engines_and_nodes_are_replaced_by_id_and_leaving_can_be_called_off(self, tmp_path):
        store = Store(tmp_path)
        cluster = store.clusters.create(
            name="c", provider="local", slaves=1, threads_per_engine=1, profile_dir="p", ipp_cluster_id="c-1"
        )
        store.nodes.put(cluster.id, NodeRecord(node_id="n-1", provider="local", state="starting"))
        store.nodes.put(cluster.id, NodeRecord(node_id="n-1", provider="local", state="running"))
        store.nodes.update(cluster.id, "n-1", note="why")
        assert [(n.node_id, n.state, n.note) for n in store.nodes.of(cluster.id)] == [("n-1", "running", "why")]
        engines = [EngineRecord(engine_id=i, host="h", pid=i, device="cpu", threads=1) for i in (1, 0)]
        store.engines.put(cluster.id, engines)
        assert [e.engine_id for e in store.engines.of(cluster.id)] == [0, 1]
        store.engines.mark_leaving(cluster.id, 1, "notice")
        assert store.engines.leaving(cluster.id) == {1: "notice"}
        store.engines.mark_leaving(cluster.id, 1, "")
        assert store.engines.leaving(cluster.id) == {}

    def test_events_come_newest_limit_oldest_first(self, tmp_path):
        store = Store(tmp_path)
        cluster = store.clusters.create(
            name="c", provider="local", slaves=1, threads_per_engine=1, profile_dir="p", ipp_cluster_id="c-1"
        )
        for n in range(5):
            store.events.add(cluster.id, "scale", f"step {n}")
        assert [e.detail for e in store.events.latest(cluster.id, limit=2)] == ["step 3", "step 4"]

    def test_demand_sums_fresh_reports_and_forgets_a_finished_holder(self, tmp_path, monkeypatch):
        import time

        store = Store(tmp_path)
        cluster = store.clusters.create(
            name="c", provider="local", slaves=1, threads_per_engine=1, profile_dir="p", ipp_cluster_id="c-1"
        )
        now = time.time()
        monkeypatch.setattr(time, "time", lambda: now - 60)  # a master that stopped reporting a minute ago
        store.demand.set(cluster.id, "old", 5)
        monkeypatch.setattr(time, "time", lambda: now)
        store.demand.set(cluster.id, "a", 2)
        store.demand.set(cluster.id, "b", 3)
        assert store.demand.total(cluster.id, fresh_s=30) == 5
        store.demand.set(cluster.id, "b", None)
        assert store.demand.total(cluster.id, fresh_s=30) == 2
        assert store.demand.total(cluster.id, fresh_s=120) == 7


class TestCheckpointFiles:
    """A run's newest checkpoint: where it stands, and forgetting it only once that is committed."""

    def test_the_position_is_where_the_newest_checkpoint_stands(self, tmp_path):
        store = Store(tmp_path)
        store.runs.create(RunRecord(id="r-1", params={}))
        assert store.checkpoints.position("r-1") is None
        store.checkpoints.save("r-1", 1, b"one")
        store.checkpoints.save("r-1", 1, b"mid", batches_done=40)
        assert store.checkpoints.position("r-1") == (1, 40)
        assert store.checkpoints.load("r-1") == (1, b"mid")

    def test_a_missing_file_is_named(self, tmp_path):
        store = Store(tmp_path)
        store.runs.create(RunRecord(id="r-1", params={}))
        store.checkpoints.save("r-1", 1, b"one").unlink()
        with pytest.raises(CheckpointError, match="r-1 is missing"):
            store.checkpoints.load("r-1")

    def test_a_forget_rolled_back_keeps_the_file_and_a_committed_one_removes_it(self, tmp_path):
        store = Store(tmp_path)
        store.runs.create(RunRecord(id="r-1", params={}))
        path = store.checkpoints.save("r-1", 1, b"one")
        with pytest.raises(KeyboardInterrupt):
            with store.transaction():
                store.checkpoints.forget("r-1")
                raise KeyboardInterrupt
        assert path.exists() and store.checkpoints.load("r-1") == (1, b"one")
        store.checkpoints.forget("r-1")
        assert not path.exists() and store.checkpoints.load("r-1") is None


def test_a_run_started_over_has_no_checkpoint_epochs_or_position(tmp_path):
    from controller.work.recorder import RunRecorder

    store = Store(tmp_path)
    store.runs.create(RunRecord(id="r-1", params={}))
    store.epochs.add(
        EpochRecord(
            run_id="r-1",
            epoch=1,
            train_loss=0.5,
            val_accuracy=0.9,
            test_accuracy=0.9,
            seconds=1,
            train_seconds=1,
            images_per_s=1,
            lr=0.1,
        )
    )
    path = store.checkpoints.save("r-1", 1, b"one", batches_done=3)
    store.runs.update("r-1", epochs_done=1, batches_done=3)
    RunRecorder(store).start_over("r-1")
    run = store.runs.get("r-1")
    assert (run.epochs_done, run.batches_done) == (0, 0)
    assert store.epochs.of("r-1") == [] and store.checkpoints.load("r-1") is None and not path.exists()

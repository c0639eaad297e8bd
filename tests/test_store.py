"""The SQLite store: runs, epochs and atomic, verified checkpoints."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from controller import schema
from controller.errors import ClusterStateError
from controller.store import CheckpointError, EngineRecord, EpochRecord, RunRecord, Store
from controller.sweep.records import SweepTable


def test_runs_and_their_epochs_round_trip(tmp_path):
    store = Store(tmp_path)
    store.create_run(RunRecord(id="r-1", params={"lr": 0.1, "epochs": 2}))
    store.add_epoch(EpochRecord(run_id="r-1", epoch=1, train_loss=0.5, val_accuracy=0.9, test_accuracy=0.91,
                                seconds=2.0, train_seconds=1.5, images_per_s=100.0, lr=0.1))
    store.update_run("r-1", state="completed", test_accuracy=0.91)
    again = Store(tmp_path)  # a second process sees committed writes
    run = again.run("r-1")
    assert run.params == {"lr": 0.1, "epochs": 2} and run.state == "completed"
    assert [e.epoch for e in again.epochs("r-1")] == [1]
    with pytest.raises(ValueError, match="run state 'done'"):
        store.update_run("r-1", state="done")


def test_state_dir_is_private(tmp_path):
    Store(tmp_path / "state")
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


def test_checkpoints_are_atomic_and_only_the_newest_is_kept(tmp_path):
    store = Store(tmp_path)
    store.create_run(RunRecord(id="r-1", params={}))
    first = store.save_checkpoint("r-1", 1, b"one")
    second = store.save_checkpoint("r-1", 2, b"two")
    assert not first.exists() and second.read_bytes() == b"two"
    assert not list(second.parent.glob("*.tmp"))
    assert store.load_checkpoint("r-1") == (2, b"two")
    assert store.load_checkpoint("r-unknown") is None


def test_a_corrupt_checkpoint_is_detected(tmp_path):
    store = Store(tmp_path)
    store.create_run(RunRecord(id="r-1", params={}))
    path = store.save_checkpoint("r-1", 1, b"good bytes")
    path.write_bytes(b"bad bytes!")
    with pytest.raises(CheckpointError, match="corrupt"):
        store.load_checkpoint("r-1")


def test_a_transaction_commits_everything_or_nothing(tmp_path):
    store = Store(tmp_path)
    store.create_run(RunRecord(id="r-1", params={}))
    store.save_checkpoint("r-1", 1, b"one")
    with pytest.raises(KeyboardInterrupt):
        with store.transaction():
            store.add_epoch(EpochRecord(run_id="r-1", epoch=2, train_loss=0.1, val_accuracy=0.9, test_accuracy=0.9,
                                        seconds=1, train_seconds=1, images_per_s=1, lr=0.1))
            store.save_checkpoint("r-1", 2, b"two")
            store.update_run("r-1", epochs_done=2)
            raise KeyboardInterrupt  # Ctrl-C between the writes
    assert store.epochs("r-1") == [] and store.run("r-1").epochs_done == 0
    assert store.load_checkpoint("r-1") == (1, b"one"), "the checkpoint the rows name is still there"


def test_the_checkpoint_rename_is_made_durable_before_the_older_file_is_deleted(tmp_path, monkeypatch):
    """After a power cut the store must never name a file whose rename was lost while the older is gone."""
    import os
    import stat

    store = Store(tmp_path)
    store.create_run(RunRecord(id="r-1", params={}))
    first = store.save_checkpoint("r-1", 1, b"one")
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
    store.save_checkpoint("r-1", 2, b"two")
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
        run = store.run("r-old00001")
        assert run.state == "completed" and run.params["lr"] == 0.01
        assert [e.epoch for e in store.epochs("r-old00001")] == [1, 2]
        sweep = SweepTable(store).get("s-old00001")
        assert sweep.state == "completed" and sweep.base_spec == {}
        assert [r.id for r in store.runs(sweep_id="s-old00001")] == ["r-old00002"]
        # the tables and columns of later versions work on it
        store.record_engines(1, [EngineRecord(engine_id=0, host="h", pid=1, device="cpu", threads=1)])
        store.mark_engine_leaving(1, 0, "drain")
        assert store.leaving_engines(1) == {0: "drain"}
        assert [row[0] for row in store.execute("SELECT COUNT(*) FROM bench_runs")] == [0]

    def test_a_new_store_is_at_the_latest_version_and_reopening_applies_nothing(self, tmp_path):
        Store(tmp_path).close()
        with sqlite3.connect(tmp_path / "cluster.db") as db:
            assert schema.migrate(db) == []
            assert schema.version(db) == schema.LATEST

    def test_a_state_dir_from_a_newer_version_is_refused_and_left_alone(self, tmp_path):
        Store(tmp_path).close()
        with sqlite3.connect(tmp_path / "cluster.db") as db:
            db.execute(f"PRAGMA user_version = {schema.LATEST + 1}")
        with pytest.raises(ClusterStateError, match=rf"cluster\.db: written by a newer version \(schema "
                                                    rf"{schema.LATEST + 1}; this version knows {schema.LATEST}\)"):
            Store(tmp_path)
        with sqlite3.connect(tmp_path / "cluster.db") as db:
            assert schema.version(db) == schema.LATEST + 1

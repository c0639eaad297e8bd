"""Checkpoint files under ``state_dir/checkpoints/<run>/``, each named by one ``checkpoints`` row.

Contract:
- A file is written to a temporary name, fsynced and renamed, and the rename made durable (the folder
  fsynced) before the row names it: a reader, or the store after a power cut, never finds half a
  checkpoint, nor a row naming a file that is not there.
- Only a run's newest checkpoint is kept; older files go only once the row naming the new one is
  committed (inside a transaction: at its COMMIT, never after a ROLLBACK).
- Loading checks the file against the sha256 in its row.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Optional

from controller.errors import DataError
from controller.store.database import Database


class CheckpointError(DataError):
    """A stored checkpoint is missing or does not match its hash."""


def fsync_dir(folder: Path) -> None:
    """Make a rename or create in ``folder`` durable: without it a power cut can undo the rename while
    the store already names the new file, and the older file is gone too."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointFiles:
    """Each run's newest checkpoint: a file under ``folder`` and its row (position, path, hash, size)."""

    def __init__(self, db: Database, folder: Path):
        self.db = db
        self.folder = Path(folder)

    def save(self, run_id: str, epoch: int, data: bytes, batches_done: int = 0) -> Path:
        """Write atomically (temp file + rename), record it, then drop older files of the run.

        ``batches_done``: a checkpoint taken that far into epoch ``epoch + 1``."""
        folder = self.folder / run_id
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)  # the run's folder itself survives a power cut
        digest = hashlib.sha256(data).hexdigest()
        # the position and the hash in the name: a new checkpoint never overwrites the file the row still names
        path = folder / (
            f"epoch-{epoch:04d}.pt" if not batches_done else f"epoch-{epoch:04d}-b{batches_done:06d}-{digest[:8]}.pt"
        )
        tmp = path.with_suffix(".pt.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)  # the rename is durable before the row names the file and the older one goes
        self.db.insert(
            "checkpoints",
            dict(
                run_id=run_id,
                epoch=epoch,
                batches_done=batches_done,
                path=str(path),
                sha256=digest,
                bytes=len(data),
                created_at=time.time(),
            ),
            replace=True,
        )

        def drop_older() -> None:  # only once the row naming the new file is committed
            for old in folder.glob("epoch-*.pt"):
                if old != path:
                    old.unlink(missing_ok=True)

        self.db.when_committed(drop_older)
        return path

    def forget(self, run_id: str) -> None:
        """Drop the run's checkpoint: its row, and its files once that is committed."""
        self.db.execute("DELETE FROM checkpoints WHERE run_id = ?", (run_id,))

        def drop_files() -> None:
            for old in (self.folder / run_id).glob("epoch-*.pt*"):
                old.unlink(missing_ok=True)

        self.db.when_committed(drop_files)

    def position(self, run_id: str) -> Optional[tuple[int, int]]:
        """(whole epochs, batches of the next epoch) where the run's stored checkpoint stands; None if none."""
        row = self.db.execute("SELECT epoch, batches_done FROM checkpoints WHERE run_id = ?", (run_id,)).fetchone()
        return (row["epoch"], row["batches_done"] or 0) if row else None

    def load(self, run_id: str) -> Optional[tuple[int, bytes]]:
        """(epoch, bytes) of the run's newest checkpoint, verified against its hash; None if none."""
        row = self.db.execute("SELECT * FROM checkpoints WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        try:
            data = Path(row["path"]).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {row['path']} of run {run_id} is missing") from None
        if hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise CheckpointError(f"checkpoint {row['path']} of run {run_id} is corrupt (hash mismatch)")
        return row["epoch"], data

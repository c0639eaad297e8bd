"""Checkpoints an engine keeps instead of shipping them to the master after every task.

A large model's checkpoint (hundreds of MB with its optimizer state) crossing to the master after every
one-minute task costs more than the task.  With ``checkpoint_minutes`` > 0 the engine keeps the newest
checkpoint of each run in memory and returns only a reference; it ships the bytes when the last shipped
copy is ``checkpoint_minutes`` old, when the task stopped for a drain or a spot notice, and when the run
ends.  The master sends the run's next task to this engine with a :class:`Held` reference in place of
the bytes; if the engine is gone by then, the master resumes from the last copy it got.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Optional, Union

# runs whose newest checkpoint an engine keeps; beyond that the oldest is dropped, and a task that refers to
# it fails with CheckpointNotHeld, which the master answers by resuming from the last shipped copy
MAX_HELD_RUNS = 4


class CheckpointNotHeld(RuntimeError):
    """The master referred to a checkpoint this engine no longer holds (the run goes back to its last
    shipped checkpoint on the master)."""


@dataclass
class _Kept:
    data: bytes
    epoch: int
    batches_done: int
    shipped_at: float  # when the master last got this run's checkpoint (monotonic seconds on this engine)


_kept: "collections.OrderedDict[str, _Kept]" = collections.OrderedDict()
_received_at: dict[str, float] = {}  # runs whose task brought its checkpoint from the master: since when


def reference(run_id: str, epoch: int, batches_done: int) -> dict:
    """What the master sends instead of the bytes: which checkpoint of which run this engine holds."""
    return {"held": run_id, "epoch": epoch, "batches_done": batches_done}


def is_reference(checkpoint: object) -> bool:
    return isinstance(checkpoint, dict) and "held" in checkpoint


def resolve(run_id: str, checkpoint: Union[bytes, dict, None], now: Optional[float] = None) -> Optional[bytes]:
    """The checkpoint's bytes: given by the master, or this engine's own copy that ``checkpoint`` refers to."""
    if not isinstance(checkpoint, dict) or not is_reference(checkpoint):
        # the master holds this one: a run that moved here counts its shipping interval from now
        _kept.pop(run_id, None)
        _received_at[run_id] = time.monotonic() if now is None else now
        return checkpoint if isinstance(checkpoint, bytes) else None
    kept = _kept.get(run_id)
    if kept is None or (kept.epoch, kept.batches_done) != (checkpoint["epoch"], checkpoint["batches_done"]):
        holds = f"epoch {kept.epoch} batch {kept.batches_done}" if kept is not None else "none"
        raise CheckpointNotHeld(
            f"run {run_id}: this engine does not hold its checkpoint at epoch {checkpoint['epoch']} batch "
            f"{checkpoint['batches_done']} (it holds {holds}); the run resumes from its last shipped checkpoint"
        )
    _kept.move_to_end(run_id)
    return kept.data


def keep_or_ship(
    run_id: str,
    data: bytes,
    epoch: int,
    batches_done: int,
    minutes: float,
    must_ship: bool,
    now: Optional[float] = None,
) -> tuple[bool, bool]:
    """Settle a task's new checkpoint: (ship it to the master now, keep it here for the run's next task).

    ``must_ship``: the run ends, or the engine is going away (drain, spot notice): the master gets the
    bytes and nothing stays behind."""
    now = time.monotonic() if now is None else now
    received = _received_at.pop(run_id, None)
    if minutes <= 0 or must_ship:
        _kept.pop(run_id, None)
        return True, False
    kept = _kept.get(run_id)
    shipped_at = kept.shipped_at if kept is not None else received if received is not None else now
    ship = now - shipped_at >= minutes * 60
    _kept[run_id] = _Kept(data, epoch, batches_done, now if ship else shipped_at)
    _kept.move_to_end(run_id)
    while len(_kept) > MAX_HELD_RUNS:
        _kept.popitem(last=False)
    return ship, True


def held_runs() -> dict[str, tuple[int, int]]:
    """Run id -> (epoch, batches done) of every checkpoint this engine holds."""
    return {run_id: (k.epoch, k.batches_done) for run_id, k in _kept.items()}


def forget(run_id: str) -> None:
    _kept.pop(run_id, None)
    _received_at.pop(run_id, None)

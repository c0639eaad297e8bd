"""A task's result as the master reads it: the record engines.loop.TaskResult sends, as a dict.

Engines return plain dicts (no class crosses ZeroMQ, and the master need not import torch); the
scheduler turns each into this record once, so every reader names fields instead of dict keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TaskResult:
    """Mirrors engines.loop.TaskResult (fields a distributed rank adds, such as ``weights``, are dropped)."""

    run_id: str = ""
    epochs: list[dict] = field(default_factory=list)  # engines.loop.EpochMetrics of the epochs finished
    checkpoint: Optional[bytes] = None  # None: the engine kept it (``held``) and has not shipped it
    completed_epochs: int = 0  # whole epochs of the run
    host: str = ""
    pid: int = 0
    device: str = ""
    threads: int = 0
    diverged: bool = False
    batches_done: int = 0  # batches of epoch completed_epochs + 1 done: where the checkpoint stands
    epoch_batches: int = 0  # batches per epoch (0: unknown)
    batches_run: int = 0  # batches this task trained; 0: it handed back the checkpoint it was given
    stopped: Optional[str] = None  # why it ended early: time, drain or notice (engines/process/stopping.py)
    held: bool = False  # the engine keeps this checkpoint: the run's next task may refer to it there

    @classmethod
    def from_dict(cls, values: dict) -> "TaskResult":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def position(self) -> tuple[int, int]:
        """(whole epochs, batches of the next epoch) where the run stands after this task."""
        return self.completed_epochs, self.batches_done

    @property
    def shipped(self) -> bool:
        """The checkpoint's bytes came with the result (the master can store it)."""
        return self.checkpoint is not None

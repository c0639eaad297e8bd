"""How numbers read in tables: durations and fractions, the same in every command and view."""

from __future__ import annotations


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def epochs_progress(epochs_done: int, epochs: object, batches_done: int = 0, epoch_batches: int = 0) -> str:
    """``2/5``, or ``2/5, epoch 3 40%`` when the last task ended part-way into the next epoch."""
    text = f"{epochs_done}/{epochs}"
    if batches_done and epoch_batches:
        text += f", epoch {epochs_done + 1} {batches_done / epoch_batches:.0%}"
    return text

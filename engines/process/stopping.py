"""Asking the task running on this engine to stop early, at its next batch boundary, with a checkpoint.

Three things ask, and each gives its reason:

- ``drain``: the master is turning this slave off (``cluster scale``/``remove``); it sends SIGUSR1
  through ipyparallel's nanny (``Client.send_signal``), which reaches the engine while it is busy.
- ``notice``: the cloud announced it takes this instance back (a spot interruption notice, seen by
  a watcher thread polling the instance metadata service).
- ``time``: the task ran for ``[training] task_seconds`` (checked by the training loop itself, not here).

``drain`` and ``notice`` are *sticky*: the engine is going away, so every later task on it stops at
once too (a task the hub had already queued for it comes straight back, checkpoint unchanged, and is
sent elsewhere).  The master clears a drain it has called off with :func:`clear`.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

from engines.spec import DRAIN, NOTICE, STOP_REASONS

REASONS = STOP_REASONS

# SIGUSR1's default action ends the process: a drain must only reach engines that installed the handler,
# which every engine does when it first reports to the master (engines.tasks.engine_info) and every task does
DRAIN_SIGNAL = signal.SIGUSR1

_lock = threading.RLock()  # re-entrant: the signal handler runs on the main thread, maybe inside `with _lock`
_reason: Optional[str] = None
_installed = False


def request(reason: str) -> None:
    """Ask the running task (and, for drain/notice, every later one) to stop at its next batch boundary.

    Safe from a signal handler and from any thread; a notice is not downgraded by a later drain."""
    global _reason
    if reason not in REASONS:
        raise ValueError(f"stop reason {reason!r}: expected one of {', '.join(REASONS)}")
    with _lock:
        if _reason != NOTICE:
            _reason = reason


def requested() -> Optional[str]:
    """The reason the running task should stop now, or None (one read of a variable: cheap per batch)."""
    return _reason


def clear(reason: Optional[str] = None) -> Optional[str]:
    """Withdraw the request (only if it is ``reason``, when given); returns what was withdrawn."""
    global _reason
    with _lock:
        withdrawn = _reason if reason is None or _reason == reason else None
        if withdrawn is not None:
            _reason = None
        return withdrawn


def install() -> bool:
    """Make DRAIN_SIGNAL ask for a drain instead of ending the process; idempotent. Only the main thread
    can install a signal handler (engines run tasks there); elsewhere this is a no-op returning False."""
    global _installed
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(DRAIN_SIGNAL, lambda signum, frame: request(DRAIN))
    _installed = True
    return True


def installed() -> bool:
    return _installed

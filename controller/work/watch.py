"""Watching tasks on engines from the master: give up on a lost cluster, tell engine losses from task
failures, kill the engine of a task that went silent, and never count a pause of the master as silence.
Shared by the scheduler, distributed runs and inference."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import ipyparallel as ipp

from controller.errors import CONTROLLER_GONE_WAY_ON, ClusterLostError

log = logging.getLogger(__name__)

# a gap this long between two looks at the tasks is a pause of the master, not silence of the engines
MASTER_PAUSE_S = 10.0
# an engine still registered after this many kills for a stalled task (its nanny died, or the signal is lost
# on the way) is given up on: its task goes elsewhere and the engine gets no other
STALL_KILLS = 2


@dataclass
class Watchdog:
    """Ends a scheduler's wait when its tasks can no longer finish, instead of waiting forever.

    ipyparallel never fails a task whose controller died (its results just never come), and keeps a
    task queued while no engine is registered; both are decided here, on the master.
    """

    controller_alive: Callable[[], bool]
    engine_timeout: float  # seconds without a single engine before the work is given up
    check_every_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _next_check: float = field(default=0.0, init=False)
    _engineless_since: Optional[float] = field(default=None, init=False)

    def check(self, engine_count: Callable[[], int]) -> None:
        now = self.clock()
        if now < self._next_check:
            return
        self._next_check = now + self.check_every_s
        if not self.controller_alive():
            raise ClusterLostError("the cluster's controller died", way_on=CONTROLLER_GONE_WAY_ON)
        if engine_count() > 0:
            self._engineless_since = None
        elif self._engineless_since is None:
            self._engineless_since = now
        elif now - self._engineless_since >= self.engine_timeout:
            raise ClusterLostError(
                f"no engine has been registered for {now - self._engineless_since:.0f} s "
                f"([cluster] engine_timeout = {self.engine_timeout:g})",
                way_on="`cluster scale N` (slaves with engines again)",
            )


def remote_error_name(error: BaseException) -> str:
    return error.ename if isinstance(error, ipp.error.RemoteError) else type(error).__name__


def is_engine_loss(error: BaseException) -> bool:
    if isinstance(error, ipp.error.EngineError):
        return True
    return isinstance(error, ipp.error.RemoteError) and error.ename in ("EngineError", "DependencyTimeout")


def discount_pause(watched: Iterable, listened_at: Optional[float], now: float) -> float:
    """Shift every watched item's ``heard_at`` by a pause of the master (a gap over MASTER_PAUSE_S since it last
    looked, ``listened_at``): the engines' silence counts only while the master listens. Returns ``now``, the
    new ``listened_at``."""
    if listened_at is not None and now - listened_at > MASTER_PAUSE_S:
        for item in watched:
            item.heard_at += now - listened_at
    return now


def kill_through_nanny(client: ipp.Client, engine: int) -> None:
    """SIGKILL a stuck engine through its nanny, which answers while the engine's own threads do not. The hub
    then drops it, and its task comes back as lost."""
    try:
        client.send_signal("SIGKILL", targets=[engine], block=False)
    except Exception:  # noqa: BLE001 - gone already: the hub drops it, and its task comes back the same way
        log.debug("could not signal engine %d", engine, exc_info=True)


def running_on(result: ipp.AsyncResult) -> Optional[int]:
    """The engine a task started on (the client learns it from the engine's first message), or None."""
    try:
        return task_metadata(result).get("engine_id")
    except (KeyError, IndexError, AttributeError):
        return None


def task_metadata(result: ipp.AsyncResult) -> dict:
    metadata = result.metadata  # the AsyncResult's own copy: the client's may be a stale placeholder
    return metadata[0] if isinstance(metadata, list) else metadata

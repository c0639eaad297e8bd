"""Stand-ins for ipyparallel's results and for the clock, for unit tests of the master's scheduling: the one
place a test drives time and task outcomes itself (every process-level test uses real engines)."""

from __future__ import annotations

import concurrent.futures
from typing import Optional


class FakeResult(concurrent.futures.Future):
    """What ``view.apply_async`` returns: a future with ipyparallel's few extra attributes."""

    def __init__(self, msg_id: str):
        super().__init__()
        self.msg_ids = [msg_id]
        self.engine_id: Optional[int] = None
        self.data: dict = {}
        self.metadata: dict = {}

    def get(self, timeout=None):
        return self.result(timeout)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TickingClock(FakeClock):
    """A second passes each time it is read."""

    def __call__(self) -> float:
        self.now += 1
        return self.now

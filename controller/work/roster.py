"""Which engines get no new task, shared through the store by every master working on the cluster.

``cluster scale``/``remove`` (another process, maybe) marks the engines it drains; a scheduler marks an
engine whose task came back with a spot interruption notice. Every scheduler reads the marks about once a
second (controller/work/scheduler.py) and keeps those engines out of its load-balanced view, as well as engines
that have not reported themselves yet (just started: still importing torch); it also reports
how many jobs it could run at once, which the keeper autoscales to (controller/cluster).
"""

from __future__ import annotations

import itertools
import os
import socket
from dataclasses import dataclass, field
from typing import Optional

from controller.store import Store
from controller.work.jobs import EngineRoster

_SCHEDULERS = itertools.count(1)


@dataclass
class StoreRoster(EngineRoster):
    store: Store
    cluster_id: int

    # who reports demand: one row per scheduler (several may run in one master process)
    holder: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{next(_SCHEDULERS)}")

    def leaving(self) -> set[int]:
        return set(self.store.engines.leaving(self.cluster_id))

    def engine_leaving(self, engine_id: int, reason: str) -> None:
        # a drain is marked in the store by whoever started it (controller/cluster/resize.py), and unmarked
        # when called off: a task that stopped for a drain the store no longer names must not mark it again
        if reason != "drain":
            self.store.engines.mark_leaving(self.cluster_id, engine_id, reason)

    def ready(self) -> set[int]:
        """Engines recorded in the store: controller.api records an engine once it has reported itself, with
        torch and the training code imported, so a task sent to it does not wait for those imports."""
        return {engine.engine_id for engine in self.store.engines.of(self.cluster_id)}

    def report_demand(self, wanted: Optional[int]) -> None:
        """How many jobs this master could run at once (None: none any more); the keeper autoscales to it.
        Written every call (about once a second): a row that stops being refreshed ages out."""
        self.store.demand.set(self.cluster_id, self.holder, wanted)

"""Which engines get no new task, shared through the store by every master working on the cluster.

``cluster scale``/``remove`` (another process, maybe) marks the engines it drains; a scheduler marks an
engine whose task came back with a spot interruption notice. Every scheduler reads the marks about once a
second (controller/scheduler.py) and keeps those engines out of its load-balanced view.
"""
from __future__ import annotations

from dataclasses import dataclass

from .store import Store


@dataclass
class StoreRoster:
    store: Store
    cluster_id: int

    def leaving(self) -> set[int]:
        return set(self.store.leaving_engines(self.cluster_id))

    def engine_leaving(self, engine_id: int, reason: str) -> None:
        self.store.mark_engine_leaving(self.cluster_id, engine_id, reason)

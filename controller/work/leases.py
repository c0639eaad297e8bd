"""Leases on runs and sweeps: one master at a time trains a run or drives a sweep.

A lease is a row in the store naming the process that holds it: host, pid and
the process's identity (boot id + start time in clock ticks, from ``/proc``),
so a pid the kernel reused for another program never counts as the holder.
Taking a lease is one write transaction: two masters racing for the same run
cannot both win.  A lease held on another host cannot be checked from here and
is honoured; the holder releases its leases when it ends, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Iterator, Optional

from controller.errors import ClusterStateError
from controller.ipp.processes import pid_alive, process_identity
from controller.store import Store

log = logging.getLogger(__name__)


class LeaseError(ClusterStateError):
    """Another live master holds the run or sweep."""


@dataclass(frozen=True)
class Lease:
    kind: str
    id: str
    host: str
    pid: int
    process: str
    taken_at: float

    def alive(self) -> bool:
        """Whether the holder still runs; a lease of another host is taken to be alive."""
        if self.host != socket.gethostname():
            return True
        return pid_alive(self.pid) and process_identity(self.pid) == self.process

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.taken_at))
        return f"process {self.pid} on {self.host} since {since}"


class Leases:
    def __init__(self, store: Store):
        self.store = store

    def get(self, kind: str, key: str) -> Optional[Lease]:
        row = self.store.execute("SELECT * FROM leases WHERE kind = ? AND id = ?", (kind, key)).fetchone()
        return Lease(**{k: row[k] for k in row.keys()}) if row else None

    def check_free(self, kind: str, key: str) -> None:
        """Raise LeaseError while another live process holds ``kind`` ``key`` (this process may)."""
        lease = self.get(kind, key)
        if lease is None or self._mine(lease) or not lease.alive():
            return
        where = (
            "this master cannot tell whether it still runs: continue there, or wait for it to end"
            if lease.host != socket.gethostname()
            else "stop that process first, or wait for it to end"
        )
        raise LeaseError(f"{kind} {key} is being run by another master: {lease.describe()}; {where}")

    def take(self, kind: str, key: str) -> Lease:
        """Take the lease for this process, or raise LeaseError naming the live holder."""
        pid = os.getpid()
        mine = Lease(kind, key, socket.gethostname(), pid, process_identity(pid), time.time())
        with self.store.transaction():  # BEGIN IMMEDIATE: check and write as one
            self.check_free(kind, key)
            self.store.execute(
                "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?)",
                (mine.kind, mine.id, mine.host, mine.pid, mine.process, mine.taken_at),
            )
        return mine

    def release(self, lease: Lease) -> None:
        self.store.execute(
            "DELETE FROM leases WHERE kind = ? AND id = ? AND host = ? AND pid = ? AND process = ?",
            (lease.kind, lease.id, lease.host, lease.pid, lease.process),
        )

    @contextlib.contextmanager
    def hold(self, kind: str, key: str) -> Iterator[Lease]:
        lease = self.take(kind, key)
        try:
            yield lease
        finally:
            self.release(lease)

    @staticmethod
    def _mine(lease: Lease) -> bool:
        return (
            lease.host == socket.gethostname()
            and lease.pid == os.getpid()
            and lease.process == process_identity(lease.pid)
        )

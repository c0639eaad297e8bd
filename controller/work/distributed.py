"""A distributed run on the master: one model trained on a set of engines at once, one epoch per task.

For every epoch the master asks the rank-0 engine for a free port on its host, sends
every engine its rank with that address (engines/ddp.py), and stores rank 0's
metrics and checkpoint exactly as a single-engine run's.  When an engine is lost, the
surviving ranks fail out of their collectives (a dead peer's sockets break at once;
otherwise the collective timeout ends them), the lost engine is dropped, and the epoch
runs again on the rest from the last checkpoint.  The global batch stays the run's
``batch_size`` on any engine count.

A rank that hangs (a stuck CUDA kernel or NCCL call: its engine's heartbeat goes on) is killed through its
engine's nanny, which frees its GPU and lets the keeper replace the engine: a rank still silent
``grace_s`` after another failed, and every rank when rank 0, once begun, reports no progress for
``stall_s`` (``[cluster] stall_minutes``) while none has failed (rank 0 reports while it trains and while
it evaluates; another rank's return counts as progress).  A rank still queued behind another task on its
engine is withdrawn instead of killed.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from controller.errors import TaskError, UsageError
from controller.store import Store
from controller.work.jobs import Job, ProgressSink
from controller.work.recorder import RunRecorder
from controller.work.watch import discount_pause, is_engine_loss, kill_through_nanny, running_on
from engines.spec import TaskResult
from engines.tasks import distributed_task, rendezvous_port

log = logging.getLogger(__name__)

# how long past the first failed rank the others may take to fail out of their collectives
# (engines/ddp.py: COLLECTIVE_TIMEOUT_S, plus room for the engine to send its error)
STRAGGLER_GRACE_S = 40.0
PORT_TIMEOUT_S = 30.0


def parse_engine_ids(text: Optional[str]) -> Optional[list[int]]:
    """'0,1' -> [0, 1]; None or '' -> None (every engine)."""
    if text is None or not str(text).strip():
        return None
    try:
        ids = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--engines {text!r}: expected engine ids like 0,1 (`cluster status` lists them)") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise UsageError(f"--engines {text!r}: expected distinct engine ids like 0,1")
    return ids


def choose_engines(available: list[int], requested: Optional[list[int]]) -> list[int]:
    if requested is None:
        if not available:
            raise UsageError("no engine is registered; `cluster status` shows the engines")
        return sorted(available)
    missing = [e for e in requested if e not in available]
    if missing:
        raise UsageError(
            f"--engines: no engine {', '.join(map(str, missing))}; the engines are "
            f"{', '.join(map(str, sorted(available))) or 'none'}"
        )
    return list(requested)


def rendezvous_address(
    port_info: dict, engine_hosts: dict[int, str], engines: list[int], known: Optional[dict[int, str]] = None
) -> str:
    """Loopback when every rank is on rank 0's host; else rank 0's node's private address when the
    provider recorded one (AWS), else the address rank 0 reported for its host name."""
    hosts = {engine_hosts.get(e) for e in engines}
    if len(hosts) == 1 and None not in hosts:
        return "127.0.0.1"
    return (known or {}).get(engines[0]) or port_info["address"]


@dataclass
class Attempt:
    """The outcome of one epoch's task on every engine of the set."""

    results: dict[int, dict] = field(default_factory=dict)  # engine id -> its rank's result
    errors: dict[int, BaseException] = field(default_factory=dict)  # engine id -> what it raised
    lost: list[int] = field(default_factory=list)  # engines gone (EngineError, or silent past the grace)
    stalled: list[int] = field(default_factory=list)  # engines killed: rank 0 reported no progress for stall_s


@dataclass
class _Silence:
    heard_at: float  # when rank 0 last reported progress (or the attempt began); moved by a pause of the master


class DistributedRun:
    """Trains one job on ``engines`` with torch.distributed; stores it as it goes.

    ``hold`` (tests): ``{"epoch": E, "step": S, "dir": path}`` makes every rank of epoch E's first
    attempt wait at training step S for ``path/go`` (engines/ddp.py ``HoldAt``).
    """

    def __init__(
        self,
        client,
        store: Store,
        engines: list[int],
        *,
        poll_s: float = 0.2,
        grace_s: float = STRAGGLER_GRACE_S,
        hold: Optional[dict] = None,
        addresses: Optional[dict[int, str]] = None,
        stall_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.store = store
        self.engines = list(engines)
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.stall_s = stall_s  # 0: never
        self.clock = clock
        self.stalled: list[int] = []  # engines stopped because rank 0 reported no progress for stall_s
        self.hold = hold
        self.addresses = addresses or {}  # engine id -> its node's private address, where the provider knows it
        self.recorder = RunRecorder(store)
        self.failovers: list[dict] = []
        self.weights: dict[int, str] = {}  # engine id -> digest of its weights after the last epoch
        self._hosts = self._engine_hosts()

    def _engine_hosts(self) -> dict[int, str]:
        """Engine id -> host name, asked of the engines themselves (cheap, and right after a restart)."""
        import socket

        view = self.client[self.engines]
        hosts = view.apply_async(socket.gethostname).get(timeout=PORT_TIMEOUT_S)
        return dict(zip(self.engines, hosts if isinstance(hosts, list) else [hosts]))

    def run(self, job: Job, sink: Optional[ProgressSink] = None) -> None:
        sink = sink or ProgressSink()
        self._describe(job)
        while not job.finished:
            hold = self.hold if self.hold and self.hold.get("epoch") == job.epochs_done + 1 else None
            self.hold = None if hold else self.hold  # only the first attempt of that epoch is held
            sink.task_submitted(job)
            attempt = self._attempt(job, sink, hold)
            if not attempt.errors and not attempt.lost:
                rank0 = TaskResult.from_dict(attempt.results[self.engines[0]])
                job.checkpoint, job.epochs_done = rank0.checkpoint, rank0.completed_epochs
                job.shipped = rank0.position
                self.weights = {e: r["weights"] for e, r in attempt.results.items()}
                self.recorder.record_result(job, rank0, self.engines[0])
                sink.task_done(job, rank0, self.engines[0])
                if rank0.diverged:
                    return
                continue
            if not attempt.lost:  # every rank answered, and some raised: the task's own fault
                engine, error = sorted(attempt.errors.items())[0]
                traceback = getattr(error, "traceback", None) or str(error)
                self.recorder.record_failure(job, traceback)
                sink.job_failed(job, error)
                raise TaskError(f"distributed run {job.run_id} failed on engine {engine}: {error}", traceback)
            survivors = [e for e in self.engines if e not in attempt.lost]
            if not survivors:
                message = f"distributed run {job.run_id}: every engine of {self.engines} was lost"
                if attempt.stalled:
                    message = (
                        f"distributed run {job.run_id}: rank 0 reported no progress for "
                        f"{self.stall_s / 60:g} min ([cluster] stall_minutes); the engines "
                        f"{', '.join(map(str, self.stalled))} were stopped. Continue the run from its last "
                        f"checkpoint with `cluster train --resume {job.run_id}` once engines are back "
                        f"(`cluster status`)"
                    )
                self.recorder.record_failure(job, message)
                raise TaskError(message)
            self.failovers.append({"epoch": job.epochs_done + 1, "lost": attempt.lost, "engines": survivors})
            log.warning(
                "run %s lost engine(s) %s; epoch %d again on engines %s from the last checkpoint",
                job.run_id,
                attempt.lost,
                job.epochs_done + 1,
                survivors,
            )
            sink.engine_lost(
                job,
                RuntimeError(
                    f"engine(s) {', '.join(map(str, attempt.lost))} lost; epoch {job.epochs_done + 1} again on "
                    f"engines {', '.join(map(str, survivors))} from the last checkpoint"
                ),
            )
            self.engines = survivors
            self._describe(job)

    def _kill(self, attempt: Attempt, pending: dict) -> None:
        """Hung ranks: the engines whose rank began are killed through their nannies (a hung engine answers
        nothing itself); a rank still queued behind another task on its engine is withdrawn instead, and
        that engine (busy) leaves the set. All are counted lost; their tasks are not waited for."""
        queued = [result for result in pending.values() if running_on(result) is None]
        for engine, result in pending.items():
            if result not in queued:
                kill_through_nanny(self.client, engine)
        if queued:
            try:
                self.client.abort(queued)
            except Exception:  # noqa: BLE001 - it began meanwhile, or its engine is gone: nothing to withdraw
                log.debug("abort failed", exc_info=True)
        attempt.lost.extend(pending)
        pending.clear()

    def _describe(self, job: Job) -> None:
        """The stored run says it is distributed, on which engines, with which global batch."""
        job.spec["distributed"] = {
            "engines": list(self.engines),
            "world": len(self.engines),
            "global_batch": job.spec["batch_size"],
            "failovers": list(self.failovers),
        }
        self.store.runs.update(job.run_id, params=job.spec)

    def _attempt(self, job: Job, sink: ProgressSink, hold: Optional[dict]) -> Attempt:
        attempt = Attempt()
        try:
            port = self.client[self.engines[0]].apply_async(rendezvous_port, "").get(timeout=PORT_TIMEOUT_S)
        except BaseException as error:  # noqa: BLE001 - sorted like the ranks' errors
            if isinstance(error, KeyboardInterrupt) or not (is_engine_loss(error) or isinstance(error, TimeoutError)):
                raise
            attempt.lost.append(self.engines[0])
            return attempt
        address = rendezvous_address(port, self._hosts, self.engines, self.addresses)
        world = len(self.engines)
        pending = {}
        for rank, engine in enumerate(self.engines):
            rendezvous = {"address": address, "port": port["port"], "rank": rank, "world": world}
            pending[engine] = self.client[engine].apply_async(
                distributed_task, job.spec, job.checkpoint, job.epochs_per_task, rendezvous, hold
            )
        first_failure: Optional[_Silence] = None  # heard_at: when the first rank failed
        last_update: Optional[dict] = None
        silence, listened_at = _Silence(self.clock()), None
        try:
            while pending:
                done, _ = concurrent.futures.wait(
                    list(pending.values()), timeout=self.poll_s, return_when=concurrent.futures.FIRST_COMPLETED
                )
                now = self.clock()  # one reading per pass: a pause of the master between two would count as silence
                listened_at = discount_pause([silence] + ([first_failure] if first_failure else []), listened_at, now)
                for engine, result in list(pending.items()):
                    if result not in done:
                        continue
                    del pending[engine]
                    try:
                        attempt.results[engine] = result.get()
                        silence.heard_at = now  # the ranks got this far together: rank 0 evaluates now
                    except Exception as error:  # noqa: BLE001 - a lost engine, or the task raised
                        if is_engine_loss(error):
                            attempt.lost.append(engine)
                        else:
                            attempt.errors[engine] = error
                        first_failure = first_failure or _Silence(now)
                leader = pending.get(self.engines[0])
                if leader is not None and running_on(leader) is None:
                    silence.heard_at = now  # rank 0 has not begun (its engine is busy with another task)
                data = leader.data if leader is not None else None
                update = data.get("progress") if isinstance(data, dict) else None
                if update and update != last_update:
                    last_update = dict(update)
                    silence.heard_at = now
                    sink.task_progress(job, update)
                sink.tick()
                if first_failure is not None and pending and now - first_failure.heard_at > self.grace_s:
                    # a live rank leaves its collectives within the timeout; one silent past it is hung or gone
                    log.warning(
                        "engines %s silent %.0f s after a rank failed; stopping them, counted as lost",
                        list(pending),
                        self.grace_s,
                    )
                    self._kill(attempt, pending)
                elif self.stall_s and first_failure is None and pending and now - silence.heard_at >= self.stall_s:
                    log.warning(
                        "run %s: rank 0 reported no progress for %.0f s ([cluster] stall_minutes = %g); "
                        "stopping engines %s",
                        job.run_id,
                        now - silence.heard_at,
                        self.stall_s / 60,
                        list(pending),
                    )
                    self.stalled.extend(pending)
                    attempt.stalled.extend(pending)
                    self._kill(attempt, pending)
        except BaseException:
            # Ctrl-C: tasks still queued are withdrawn; running ranks end with the group (or its timeout)
            try:
                self.client.abort([r for r in pending.values() if not r.done()])
            except Exception:
                log.debug("abort failed", exc_info=True)
            raise
        if not attempt.lost:
            # a rank that raised because its peer vanished: is that engine still registered?
            registered = set(self.client.ids)
            attempt.lost.extend(e for e in attempt.errors if e not in registered)
        for engine in attempt.lost:
            attempt.errors.pop(engine, None)
        return attempt

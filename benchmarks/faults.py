"""Faults during a sweep: busy engines killed at random moments and one spot notice, with replace_lost on.

A sweep runs on 4 local engines (real MNIST, `task_seconds` short) while a second thread, at random
moments, kills a busy engine with SIGKILL (5 times) and then plays one spot interruption notice to a
busy engine through a local IMDSv2 server (`[cluster] metadata_url`). The keeper replaces each lost
engine. Measured per fault:

- recovery: from the kill (or notice) to the lost task's run running again on another engine (the
  engine's first word about the task, which the scheduler hears within its 0.2 s poll);
- first progress: from the fault to the first progress report of the resumed task (engines report
  after 0.5 s of training, so this is recovery plus the checkpoint load plus ~0.5 s);
- epochs redone: how far the lost task had got beyond the checkpoint it restarts from (its last
  progress report minus its checkpoint position; the <0.5 s between that report and the kill is not
  counted);
- engines back: from the fault to the engine count being 4 again;
- heard / resent: when the master learnt of the loss, and when it sent the task again (at once: when
  no engine is free, a task still queued is withdrawn and the lost one takes its place; the number
  withdrawn is printed).

Prints a table of faults, then, last, one JSON line:
{"trials", "trials_lost", "kills", "epochs_redone_per_kill", "median_recovery_s", "max_recovery_s",
 "engines_at_end", ...}. Targets: 0 lost, <= 0.25 epochs redone per kill, median <= 5 s, 4 engines at end.

    python benchmarks/faults.py                       # 4 engines x 1 thread, 24 trials x 3 epochs of 8,000 images
    python benchmarks/faults.py --kills 5 --seed 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from common import REPO, data_dir

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the IMDSv2 server the notice tests use

from imds import SPOT, FakeImds  # noqa: E402

from controller.api import Cluster  # noqa: E402
from controller.config import load_config  # noqa: E402
from controller.ipp.client import connect_client
from controller.ipp.profile import url_file
from controller.store import Store  # noqa: E402
from controller.work.jobs import ProgressSink  # noqa: E402


@dataclass
class Fault:
    kind: str  # kill, notice
    engine: int
    at: float  # time.monotonic()
    run_id: str = ""
    redone_epochs: float = 0.0
    recovered_at: Optional[float] = None  # the resumed task began on an engine
    progress_at: Optional[float] = None  # its first progress report
    lost_at: Optional[float] = None  # when the master heard of it
    resubmitted_at: Optional[float] = None
    engines_back_at: Optional[float] = None

    @property
    def recovery_s(self) -> Optional[float]:
        return None if self.recovered_at is None else self.recovered_at - self.at

    @property
    def progress_s(self) -> Optional[float]:
        return None if self.progress_at is None else self.progress_at - self.at


@dataclass
class Journal:
    """What the sweep's scheduler reports, read by the fault thread (one lock for both)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    last_progress: dict = field(default_factory=dict)  # run id -> (monotonic, update)
    faults: list[Fault] = field(default_factory=list)
    waiting: dict = field(default_factory=dict)  # run id -> the fault whose recovery is awaited
    progress_reports: int = 0
    withdrawn: int = 0  # queued tasks withdrawn so that a lost one went first

    def fault_for(self, run_id: str) -> Optional[Fault]:
        """The newest fault not yet tied to a run: the task that just came back lost (or noticed)."""
        for fault in reversed(self.faults):
            if not fault.run_id:
                return fault
        return None


class FaultSink(ProgressSink):
    def __init__(self, journal: Journal):
        self.journal = journal

    def task_submitted(self, job) -> None:
        with self.journal.lock:
            fault = self.journal.waiting.get(job.run_id)
            if fault is not None and fault.resubmitted_at is None:
                fault.resubmitted_at = time.monotonic()

    def task_started(self, job, engine_id: int) -> None:
        with self.journal.lock:
            fault = self.journal.waiting.get(job.run_id)
            if fault is not None and fault.resubmitted_at is not None and fault.recovered_at is None:
                fault.recovered_at = time.monotonic()

    def task_withdrawn(self, job) -> None:
        with self.journal.lock:
            self.journal.withdrawn += 1

    def task_progress(self, job, update: dict) -> None:
        now = time.monotonic()
        with self.journal.lock:
            self.journal.progress_reports += 1
            self.journal.last_progress[job.run_id] = (now, dict(update))
            fault = self.journal.waiting.get(job.run_id)
            if fault is not None and fault.recovered_at is not None:
                fault.progress_at = now
                del self.journal.waiting[job.run_id]

    def engine_lost(self, job, error: BaseException) -> None:
        self._lost(job, "kill")

    def task_done(self, job, result, engine_id) -> None:
        if result.stopped == "notice":
            self._lost(job, "notice", redone=0.0)
            return
        with self.journal.lock:
            # a resumed task can end before its first progress report (the rest of its epoch was short):
            # its result is its first progress, or the fault thread would wait for a report that never comes
            fault = self.journal.waiting.get(job.run_id)
            if fault is not None and fault.recovered_at is not None:
                fault.progress_at = time.monotonic()
                del self.journal.waiting[job.run_id]

    def _lost(self, job, kind: str, redone: Optional[float] = None) -> None:
        with self.journal.lock:
            fault = self.journal.fault_for(job.run_id)
            if fault is None or fault.kind != kind:
                return
            fault.run_id = job.run_id
            fault.lost_at = time.monotonic()
            if redone is None:
                _, update = self.journal.last_progress.get(job.run_id, (0, {}))
                fault.redone_epochs = _redone(update, job)
            else:
                fault.redone_epochs = redone
            self.journal.waiting[job.run_id] = fault


def _redone(update: dict, job) -> float:
    """Epochs between the lost task's last progress report and the checkpoint the run restarts from."""
    if not update.get("batches"):
        return 0.0
    reached = (update["epoch"] - 1) + update["batch"] / update["batches"]
    restart = job.epochs_done + job.batches_done / update["batches"]
    return max(0.0, reached - restart)


class FaultPlayer(threading.Thread):
    """Kills a busy engine ``kills`` times at random moments, then plays one spot notice."""

    def __init__(
        self,
        cluster: Cluster,
        journal: Journal,
        imds: FakeImds,
        kills: int,
        engines: int,
        rng: random.Random,
        pause: tuple[float, float],
    ):
        super().__init__(daemon=True, name="faults")
        record = cluster.record
        self.url = url_file(Path(record.profile_dir), record.ipp_cluster_id)
        self.state_dir = cluster.config.state_dir
        self.cluster_id = record.id
        self.journal, self.imds, self.kills, self.engines, self.rng, self.pause = (
            journal,
            imds,
            kills,
            engines,
            rng,
            pause,
        )
        self.done = threading.Event()
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        client = connect_client(self.url, timeout=30)
        store = Store(self.state_dir)
        try:
            for number in range(self.kills + 1):
                if self.done.is_set():
                    return
                time.sleep(self.rng.uniform(*self.pause))
                busy = self._busy_engine(client, store)
                if busy is None:
                    return  # the sweep ended
                engine_id, pid = busy
                kind = "kill" if number < self.kills else "notice"
                fault = Fault(kind, engine_id, time.monotonic())
                with self.journal.lock:
                    self.journal.faults.append(fault)
                if kind == "kill":
                    os.kill(pid, signal.SIGKILL)
                else:
                    self.imds.announce(SPOT, pid=pid)
                self._wait_back(client, fault)
        except BaseException as error:  # noqa: BLE001 - reported by main
            self.error = error
        finally:
            client.close()
            store.close()

    def _busy_engine(self, client, store: Store) -> Optional[tuple[int, int]]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self.done.is_set():
            queues = client.queue_status()
            pids = {
                e.engine_id: e.pid
                for e in store.engines.of(self.cluster_id)
                if not e.leaving and e.engine_id in client.ids
            }
            busy = [
                engine
                for engine, queue in queues.items()
                if isinstance(engine, int) and queue.get("tasks") and engine in pids
            ]
            if busy:
                engine = self.rng.choice(sorted(busy))
                return engine, pids[engine]
            time.sleep(0.1)
        return None

    def _wait_back(self, client, fault: Fault, timeout: float = 120) -> None:
        """Until the lost task runs again and the keeper has the engine count back."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.done.is_set():
            with self.journal.lock:
                recovered = fault.progress_at is not None
            if fault.engines_back_at is None and len(client.ids) >= self.engines and fault.engine not in client.ids:
                fault.engines_back_at = time.monotonic()
            if recovered and fault.engines_back_at is not None:
                return
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=3, help="epoch budget of every trial")
    parser.add_argument("--subset", type=int, default=8_000, help="training images per epoch")
    parser.add_argument("--task-seconds", type=float, default=1.0, help="[training] task_seconds")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = data_dir()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp, FakeImds() as imds:
        ini = Path(tmp) / "cluster.ini"
        ini.write_text(
            f"[cluster]\nname = faults\nslaves = {args.engines}\nstate_dir = {tmp}/state\n"
            f"data_dir = {data}\nthreads_per_engine = {args.threads}\ndownload = false\n"
            f"replace_lost = true\nmetadata_url = {imds.url}\n"
            f"[training]\ntask_seconds = {args.task_seconds:g}\n"
        )
        cluster = Cluster(load_config(ini, environ={}))
        cluster.start()
        journal = Journal()
        player = FaultPlayer(cluster, journal, imds, args.kills, args.engines, rng, pause=(2.0, 6.0))
        try:
            player.start()
            started = time.monotonic()
            result = cluster.sweep(
                params=["lr=log:0.002:0.05", "l1=log:1e-6:1e-4"],
                trials=args.trials,
                sampler="random",
                seed=args.seed,
                epochs=args.epochs,
                subset=args.subset,
                progress=lambda source: FaultSink(journal),
            )
            sweep_s = time.monotonic() - started
            player.done.set()
            player.join(timeout=30)
            deadline = time.monotonic() + 60
            while len(cluster.client.ids) != args.engines and time.monotonic() < deadline:
                time.sleep(0.2)  # the keeper may still be replacing the last engine
            engines_at_end = len(cluster.client.ids)
        finally:
            player.done.set()
            cluster.stop()
            cluster.close()
    if player.error is not None:
        raise SystemExit(f"the fault thread failed: {player.error!r}")
    faults = journal.faults
    print(
        f"{args.trials} trials x {args.epochs} epochs of {args.subset:,} images on {args.engines} local engines "
        f"x {args.threads} thread, task_seconds {args.task_seconds:g}, replace_lost on; sweep {sweep_s:.0f} s"
    )
    print(
        f"{'fault':8} {'engine':>6} {'run':16} {'epochs redone':>14} {'heard s':>8} {'resent s':>9} "
        f"{'recovery s':>11} {'first progress s':>17} {'engines back s':>15}"
    )
    for fault in faults:
        back = "-" if fault.engines_back_at is None else f"{fault.engines_back_at - fault.at:.1f}"
        recovery = "-" if fault.recovery_s is None else f"{fault.recovery_s:.2f}"
        progress = "-" if fault.progress_s is None else f"{fault.progress_s:.2f}"
        heard = "-" if fault.lost_at is None else f"{fault.lost_at - fault.at:.2f}"
        resent = "-" if fault.resubmitted_at is None else f"{fault.resubmitted_at - fault.at:.2f}"
        print(
            f"{fault.kind:8} {fault.engine:>6} {fault.run_id or '-':16} {fault.redone_epochs:>14.3f} {heard:>8} "
            f"{resent:>9} {recovery:>11} {progress:>17} {back:>15}"
        )
    print(f"queued tasks withdrawn so that a lost one went first: {journal.withdrawn}")
    kills = [f for f in faults if f.kind == "kill"]
    recoveries = [f.recovery_s for f in faults if f.recovery_s is not None]
    to_progress = [f.progress_s for f in faults if f.progress_s is not None]
    counts = result.counts()
    lost = sum(n for state, n in counts.items() if state not in ("COMPLETE", "PRUNED"))
    summary = {
        "trials": len(result.trials),
        "trials_lost": lost,
        "kills": len(kills),
        "notices": len(faults) - len(kills),
        "epochs_redone_per_kill": round(statistics.mean(f.redone_epochs for f in kills), 3) if kills else None,
        "median_recovery_s": round(statistics.median(recoveries), 2) if recoveries else None,
        "max_recovery_s": round(max(recoveries), 2) if recoveries else None,
        "median_to_first_progress_s": round(statistics.median(to_progress), 2) if to_progress else None,
        "unrecovered": sum(1 for f in faults if f.recovery_s is None),
        "engines_at_end": engines_at_end,
        "progress_reports": journal.progress_reports,
        "withdrawn": journal.withdrawn,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

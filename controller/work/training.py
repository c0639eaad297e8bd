"""Training runs on a session's engines: ``cluster train`` and ``cluster train --resume``.

A run is one model trained to its epoch budget, cut into tasks (an epoch or ``task_seconds``, whichever
first) that the scheduler sends to a free engine and moves when that engine goes; or, distributed, one
model on several engines at once (controller/work/distributed.py). The store holds the run, its epochs and a
checkpoint that resumes it, so a run cut short by Ctrl-C, a lost engine or a lost controller goes on
with ``--resume``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from controller.config import task_keys
from controller.errors import ClusterLostError, TaskError, UsageError
from controller.store import EpochRecord, RunRecord, Store, new_id
from controller.work.jobs import Job, ProgressSink
from controller.work.leases import Leases
from controller.work.recorder import RunRecorder, SingleRun
from controller.work.session import Session


@dataclass
class RunResult:
    run: RunRecord
    epochs: list[EpochRecord]

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self.run)
        record["epochs"] = [dataclasses.asdict(e) for e in self.epochs]
        return record


def run_result(store: Store, run_id: str) -> RunResult:
    run = store.runs.get(run_id)
    if run is None:
        raise UsageError(f"no run {run_id!r}; `cluster runs` lists them")
    return RunResult(run=run, epochs=store.epochs.of(run_id))


class Training:
    """Starts and resumes runs on ``session``; ``run_id`` is the run it is on, or was last (Ctrl-C hints)."""

    def __init__(self, session: Session):
        self.session = session
        self.store = session.store
        self.run_id: Optional[str] = None

    def train(
        self,
        progress: Optional[ProgressSink] = None,
        *,
        distributed: bool = False,
        engines: Optional[list[int]] = None,
        **overrides: Any,
    ) -> RunResult:
        """One training run on a free engine; returns when it ends (Ctrl-C leaves it resumable).

        ``distributed=True``: one model on every engine (or on ``engines``, ids) with torch.distributed,
        the global batch ``batch_size`` split over them (controller/work/distributed.py).
        """
        if engines is not None and not distributed:
            raise UsageError("--engines chooses the engines of a --distributed run; add --distributed")
        spec = self.session.run_spec(**overrides)
        run_id = new_id("r-")
        spec["run_id"] = run_id
        leases = Leases(self.store)
        with leases.hold("run", run_id):
            self.store.runs.create(RunRecord(id=run_id, params=spec, cluster_id=self.session.record.id))
            self.run_id = run_id
            if distributed:
                return self._distributed(Job(run_id=run_id, spec=spec), progress, engines)
            return self._on_one_engine(Job(run_id=run_id, spec=spec), progress)

    def resume(
        self, run_id: str, progress: Optional[ProgressSink] = None, engines: Optional[list[int]] = None
    ) -> RunResult:
        """Continue a run from its last checkpoint to the end of its epoch budget.

        A distributed run resumes distributed, on every engine or on ``engines`` (any count: the
        global batch stays the run's ``batch_size``)."""
        run = self.store.runs.get(run_id)
        if run is None:
            raise UsageError(f"--resume {run_id}: no such run; `cluster runs` lists them")
        if run.state == "completed":
            raise UsageError(f"--resume {run_id}: the run already completed all {run.epochs_done} epochs")
        from engines.tasks import task_for

        leases = Leases(self.store)
        if run.sweep_id:  # a trial: its sweep's master may be training it right now
            leases.check_free("sweep", run.sweep_id)
        # before anything else: a second master must not touch the run (or its checkpoint files) at all
        with leases.hold("run", run_id):
            stored = self.store.checkpoints.load(run_id)
            checkpoint = stored[1] if stored else None
            # progress recorded after the stored checkpoint (kept on an engine, checkpoint_minutes) is redone
            position = RunRecorder(self.store).resume_from_checkpoint(run_id)
            self.store.runs.update(
                run_id, state="running", error=None, finished_at=None, cluster_id=self.session.record.id
            )
            job = Job(
                run_id=run_id,
                spec=self._resumed_spec(run.params),
                checkpoint=checkpoint,
                epochs_done=position[0],
                batches_done=position[1],
                shipped=position,
                task=task_for(run.params),
            )
            self.run_id = run_id
            if run.params.get("distributed"):
                return self._distributed(job, progress, engines)
            if engines is not None:
                raise UsageError(f"--engines: run {run_id} is not distributed; it resumes on one free engine")
            return self._on_one_engine(job, progress)

    def _resumed_spec(self, params: dict) -> dict:
        """A stored run's spec, with how this cluster cuts it into tasks (not what it trains) from now."""
        from engines.spec import stored_params

        training = self.session.config.training
        return {**stored_params(params), **task_keys(training)}

    def _distributed(self, job: Job, progress: Optional[ProgressSink], engines: Optional[list[int]]) -> RunResult:
        from controller.work.distributed import DistributedRun, choose_engines

        chosen = choose_engines(list(self.session.client.ids), engines)
        record = self.session.record
        private = {n.node_id: n.private_ip for n in self.store.nodes.of(record.id) if n.private_ip}
        addresses = {e.engine_id: private[e.node_id] for e in self.store.engines.of(record.id) if e.node_id in private}
        try:
            DistributedRun(
                self.session.client,
                self.store,
                chosen,
                addresses=addresses,
                stall_s=self.session.config.cluster.stall_minutes * 60,
            ).run(job, progress)
        except BaseException:
            RunRecorder(self.store).mark_interrupted([job.run_id])
            raise
        return run_result(self.store, job.run_id)

    def _on_one_engine(self, job: Job, progress: Optional[ProgressSink]) -> RunResult:
        source = SingleRun(self.store, job)
        try:
            self.session.scheduler().run(source, progress)
        except BaseException as error:
            source.recorder.mark_interrupted([job.run_id])
            run = self.store.runs.get(job.run_id)
            if isinstance(error, ClusterLostError) and run is not None:
                raise ClusterLostError(
                    f"{error}; run {run.id} is stored up to epoch {run.epochs_done}: {error.way_on}, "
                    f"then continue it with `cluster train --resume {run.id}`",
                    error.way_on,
                ) from None
            raise
        if source.error is not None:
            raise TaskError(f"run {job.run_id} failed on its engine: {source.error}", source.traceback)
        return run_result(self.store, job.run_id)

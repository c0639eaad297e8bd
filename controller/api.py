"""The Python API that the CLI and the notebooks share.

from controller import Cluster
cluster = Cluster()                 # reads cluster.ini as the CLI does
cluster.start(slaves=2)
run = cluster.train(epochs=1)       # a RunResult: the stored run and its epochs
cluster.stop()
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from controller.cluster import resize
from controller.cluster.handle import ClusterHandle
from controller.cluster.lifecycle import Lifecycle, Stopped
from controller.cluster.status import ClusterStatus, EngineStatus, snapshot
from controller.config import Config
from controller.errors import UsageError
from controller.providers import NO_HOOKS, Hooks
from controller.providers.base import Resource
from controller.store import RunRecord
from controller.work.bench.report import report
from controller.work.bench.runner import run_bench
from controller.work.bench.workloads import workload as find_workload
from controller.work.jobs import ProgressSink
from controller.work.sweep.records import SweepResult
from controller.work.training import RunResult, Training, run_result

__all__ = ["Cluster", "ClusterStatus", "EngineStatus", "RunResult", "Stopped"]

log = logging.getLogger(__name__)


class Cluster(ClusterHandle):
    """One named cluster under one state_dir: start, status, scale, train, infer, sweep, bench, report, stop."""

    def __init__(
        self,
        config: Optional[Config] = None,
        *,
        config_file: Optional[str | os.PathLike] = None,
        provider_hooks: Hooks = NO_HOOKS,
    ):
        super().__init__(config, config_file=config_file, provider_hooks=provider_hooks)
        self._training = Training(self)
        self._lifecycle = Lifecycle(self.config, self.store, self.provider, self.run_spec)

    @classmethod
    def connect(cls, config: Optional[Config] = None, *, config_file: Optional[str | os.PathLike] = None) -> "Cluster":
        """The running cluster (raises NotRunningError if there is none), with its client connected."""
        cluster = cls(config, config_file=config_file)
        cluster.client  # noqa: B018 - connects, or raises with a clear message
        return cluster

    # lifecycle (controller/cluster/lifecycle.py) and status (controller/cluster/status.py) ----------------
    def start(
        self,
        slaves: Optional[int] = None,
        provider: Optional[str] = None,
        *,
        min_slaves: Optional[int] = None,
        max_slaves: Optional[int] = None,
        idle_minutes: Optional[float] = None,
        fresh: bool = False,
    ) -> ClusterStatus:
        """Start the controller and ``slaves`` slaves; returns once every engine registered.

        ``max_slaves`` > 0 turns autoscaling on: slaves are added for waiting jobs up to it, and slaves idle
        for ``idle_minutes`` are turned off down to ``min_slaves``. With ``[cluster] replace_lost`` or
        autoscaling, a background keeper process holds the cluster to its target (controller/cluster).
        On any failure, Ctrl-C included, everything started so far is stopped again.

        After the master restarted (the cluster's controller gone, its slaves still up), the slaves are
        adopted by a new controller, same cluster record (docs/elastic.md); ``fresh`` releases them and
        starts new ones instead.
        """
        self._close_client()  # a client of an earlier controller of this cluster would talk to no one
        self._lifecycle.start(
            fresh=fresh,
            slaves=slaves,
            provider=provider,
            min_slaves=min_slaves,
            max_slaves=max_slaves,
            idle_minutes=idle_minutes,
        )
        return self.status()

    def stop(self, all_clusters: bool = False, any_owner: bool = False, only: Optional[set[str]] = None) -> Stopped:
        """Stop every engine, slave and the controller; history stays. Safe to run twice.

        Without a record (local state lost), or with ``all_clusters``, the provider
        also looks for nodes by its own tags (the cloud's truth) and releases them:
        this master's (user@host) only, unless ``any_owner``; ``only`` limits that to
        the ids ``stop_plan`` listed and the user agreed to.
        """
        self._close_client()
        return self._lifecycle.stop(all_clusters, any_owner, only)

    def stop_plan(self, all_clusters: bool = False, any_owner: bool = False) -> "list[Resource]":
        """What ``stop(all_clusters, any_owner)`` would release by tag, beyond this cluster's own record."""
        return self._lifecycle.stop_plan(all_clusters, any_owner)

    def status(self) -> ClusterStatus:
        """The cluster now: its engines and nodes, size, keeper, cost so far; after the controller died,
        a hint on how to go on. A keeper that died is started again first."""
        self._revive_keeper()
        return snapshot(self.name, self.config, self.store, self.provider)

    # resizing (controller/cluster/resize.py) ---------------------------------------------------------------
    def scale(self, slaves: int, *, why: str = "") -> ClusterStatus:
        """Turn slaves on or off until ``slaves`` serve; returns once the new engines joined (they take work
        from a sweep or bench already running) or the removed ones were drained and released."""
        resize.scale(self, slaves, why)
        return self.status()

    def remove(self, node_ids: list[str], *, why: str = "") -> ClusterStatus:
        """Drain these slaves (their tasks stop at a batch boundary and go on elsewhere), then release them;
        the cluster's target shrinks by as many."""
        resize.remove(self, node_ids, why)
        return self.status()

    # training -------------------------------------------------------------------
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
        return self._training.train(progress, distributed=distributed, engines=engines, **overrides)

    def resume(
        self, run_id: str, progress: Optional[ProgressSink] = None, engines: Optional[list[int]] = None
    ) -> RunResult:
        """Continue a run from its last checkpoint to the end of its epoch budget.

        A distributed run resumes distributed, on every engine or on ``engines`` (any count: the
        global batch stays the run's ``batch_size``)."""
        return self._training.resume(run_id, progress, engines)

    @property
    def current_run_id(self) -> Optional[str]:
        """The run train()/resume() is on, or was last (for Ctrl-C hints)."""
        return self._training.run_id

    def run_result(self, run_id: str) -> RunResult:
        return run_result(self.store, run_id)

    def runs(self, limit: Optional[int] = None, sweep_id: Optional[str] = None) -> list[RunRecord]:
        return self.store.runs.all(limit=limit, sweep_id=sweep_id)

    # inference -------------------------------------------------------------------
    def infer(
        self,
        run_id: Optional[str] = None,
        *,
        checkpoint: Optional[str | os.PathLike] = None,
        split: str = "test",
        workload: Optional[str] = None,
        engines: Optional[list[int]] = None,
        shards_per_engine: int = 1,
        out: Optional[str | os.PathLike] = None,
        progress=None,
        data_dir: Optional[str] = None,
    ):
        """Apply a trained model to a whole split over the engines; an InferenceResult (controller/work/inference.py).

        The model is a run's last checkpoint (``run_id``) or a checkpoint file; each engine loads it once
        and keeps it for later calls.  ``workload`` (paper, mnist-cnn, cifar10-vgg16, cifar10-resnet18)
        checks the checkpoint is of that kind; ``out`` writes a .csv or .npz of the predictions.
        ``progress``: a callable (images done, images in all).  ``data_dir``: where the engines find the
        data set (default: the run's own, else [cluster] data_dir).
        """
        from controller.work.distributed import choose_engines
        from controller.work.inference import Inference, write_predictions

        if (run_id is None) == (checkpoint is None):
            raise UsageError("infer: give one of --run RUN_ID or --checkpoint PATH")
        if run_id is not None:
            run = self.store.runs.get(run_id)
            if run is None:
                raise UsageError(f"--run {run_id}: no such run; `cluster runs` lists them")
            data_dir = data_dir or run.params.get("data_dir")
            stored = self.store.checkpoints.load(run_id)
            if stored is None:
                raise UsageError(f"--run {run_id}: the run has no checkpoint yet")
            data = stored[1]
        else:
            try:
                data = Path(checkpoint).expanduser().read_bytes()  # type: ignore[arg-type]  # one of the two is given
            except OSError as error:
                raise UsageError(f"--checkpoint {checkpoint}: {error.strerror or error}") from None
        expect_kind = find_workload(workload).kind if workload is not None else None
        if out is not None and Path(out).suffix not in (".csv", ".npz"):
            raise UsageError(f"--out {out}: expected a .csv or .npz file name")
        job = Inference(
            self.client,
            choose_engines(list(self.client.ids), engines),
            shards_per_engine=shards_per_engine,
            threads=self.record.threads_per_engine,
            stall_s=self.config.cluster.stall_minutes * 60,
        )
        result = job.run(
            data,
            split,
            data_dir or str(self.config.data_dir),
            run_id=run_id,
            expect_kind=expect_kind,
            progress=progress,
        )
        if out is not None:
            write_predictions(result, Path(out))
        return result

    # benchmarks and reports ------------------------------------------------------
    def bench(
        self,
        workload: str = "paper",
        engines: Optional[list[int]] = None,
        epochs: Optional[int] = None,
        subset: Optional[int] = None,
        progress=None,
        data_dir: Optional[str] = None,
    ):
        """Run a standard workload on each engine count in ``engines`` (default: all); a BenchResult."""
        return run_bench(
            self, workload=workload, engines=engines, epochs=epochs, subset=subset, progress=progress, data_dir=data_dir
        )

    def report(self, fmt: str = "md", bench_ids: Optional[list[str]] = None, workload: Optional[str] = None) -> str:
        """The stored bench records as md, csv, json or html text; needs no running cluster."""
        return report(self.store, fmt, bench_ids=bench_ids, workload=workload)

    # sweeps ----------------------------------------------------------------------
    def sweep(
        self,
        params: Any = None,
        *,
        preset: Optional[str] = None,
        trials: Optional[int] = None,
        sampler: Optional[str] = None,
        pruner: str = "none",
        seed: int = 0,
        resume: Optional[str] = None,
        progress: Any = None,
        task: Any = None,
        **overrides: Any,
    ) -> SweepResult:
        """Train many settings at once, one trial per free engine, until the sweep ends.

        ``params``: ``{"lr": [0.01, 0.05], "hidden": "int:50:500"}`` or ``["lr=log:1e-3:1e-1", ...]``;
        ``preset="paper"``: the paper's lambda grid.  ``sampler``: grid (default for lists), random or
        tpe (default for ranges); ``pruner``: none, median or asha.  ``overrides``: [training] values
        every trial shares (epochs, subset, ...).  ``resume=SWEEP_ID`` continues a stopped sweep.
        ``progress``: a callable (SweepSource) -> ProgressSink, e.g. ``controller.work.sweep.view.SweepProgress``.
        ``task``: the engine function (defaults to engines.tasks.train_task).
        Ctrl-C leaves the sweep resumable; returns the ranked results.
        """
        from controller.work.sweep import runner  # optuna: loaded by the sweep commands only, not by every command

        if resume is not None:
            if params or preset or trials or sampler or pruner != "none" or overrides:
                raise UsageError(f"--resume {resume} continues a sweep with its own settings; give nothing else")
            return runner.resume_sweep(self, resume, progress=progress, task=task)
        return runner.run_sweep(
            self,
            params,
            preset=preset,
            trials=trials,
            sampler=sampler,
            pruner=pruner,
            seed=seed,
            progress=progress,
            task=task,
            **overrides,
        )

    def sweeps(self, limit: Optional[int] = None) -> list[SweepResult]:
        """Past sweeps, newest first (the cluster need not be running)."""
        from controller.work.sweep import runner  # optuna, as above

        return runner.sweeps(self, limit)

    def results(self, sweep_id: str) -> SweepResult:
        """A sweep's trials ranked by validation accuracy, and its best configuration."""
        from controller.work.sweep import runner  # optuna, as above

        return runner.results(self, sweep_id)

"""Running a sweep on a cluster: create or reload its study, then let the scheduler drive it.

``Cluster.sweep``, ``Cluster.sweeps`` and ``Cluster.results`` delegate here, handing themselves over as
the :class:`~controller.work.session.Session`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState

from controller.config import TASK_KEYS
from controller.errors import ClusterLostError, UsageError
from controller.store import new_id
from controller.work.jobs import Job, ProgressSink
from controller.work.leases import Leases
from controller.work.recorder import RunRecorder
from controller.work.session import Session
from controller.work.sweep import study as studies
from controller.work.sweep.records import SweepRecord, SweepResult, SweepTable, collect
from controller.work.sweep.source import SweepSource, job_for
from controller.work.sweep.space import SWEEPABLE, ParamsLike, SearchSpace, build_space
from controller.work.sweep.space import preset as get_preset

log = logging.getLogger(__name__)

DEFAULT_SEARCH_TRIALS = 20
# [training] keys every trial of a sweep may share (the swept ones come from the space)
SHARED_OVERRIDES = set(SWEEPABLE) | {"subset", "schedule", "seed", "device"}

# RunSpec keys about this master's cluster, not about what a trial trains
ENVIRONMENT_KEYS = ("data_dir", "download", "threads", *TASK_KEYS)

ProgressFactory = Callable[[SweepSource], ProgressSink]


def plan(
    params: ParamsLike = None,
    *,
    preset: Optional[str] = None,
    trials: Optional[int] = None,
    sampler: Optional[str] = None,
    pruner: str = "none",
    overrides: Optional[dict] = None,
) -> tuple[SearchSpace, str, int]:
    """Check everything about a new sweep before anything starts: (space, sampler, trials)."""
    space = SearchSpace()
    if preset:
        chosen = get_preset(preset)
        space, sampler = chosen.space, sampler or chosen.sampler
    space = space.merged(build_space(params))
    if not space.params:
        raise UsageError(
            "a sweep needs something to vary: --param NAME=FORM (e.g. --param lr=0.01,0.05) or --preset paper"
        )
    unknown = set(overrides or {}) - SHARED_OVERRIDES
    if unknown:
        raise UsageError(
            f"unknown training parameter(s) for a sweep: {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(SHARED_OVERRIDES))}"
        )
    both = set(overrides or {}) & set(space.names)
    if both:
        raise UsageError(f"{', '.join(sorted(both))} is both swept (--param) and fixed; give it one way")
    sampler = sampler or ("grid" if space.is_grid else "tpe")
    if sampler not in studies.SAMPLERS:
        raise UsageError(f"--sampler {sampler!r}: expected one of {', '.join(studies.SAMPLERS)}")
    if pruner not in studies.PRUNERS:
        raise UsageError(f"--pruner {pruner!r}: expected one of {', '.join(studies.PRUNERS)}")
    if trials is not None and trials < 1:
        raise UsageError(f"--trials {trials}: expected an integer >= 1")
    if sampler == "grid":
        space.grid()  # raises, naming the ranges, when a parameter is not a list
        trials = min(trials, space.grid_size()) if trials else space.grid_size()
    elif trials is None:
        trials = DEFAULT_SEARCH_TRIALS
    return space, sampler, trials


def run_sweep(
    session: Session,
    params: ParamsLike = None,
    *,
    preset: Optional[str] = None,
    trials: Optional[int] = None,
    sampler: Optional[str] = None,
    pruner: str = "none",
    seed: int = 0,
    progress: Optional[ProgressFactory] = None,
    task: Optional[Callable[..., dict]] = None,
    **overrides: Any,
) -> SweepResult:
    overrides = {k: v for k, v in overrides.items() if v is not None}
    space, sampler, n_trials = plan(
        params, preset=preset, trials=trials, sampler=sampler, pruner=pruner, overrides=overrides
    )
    base_spec = session.run_spec(**overrides)  # validates the shared overrides; needs a running cluster
    record = session.record
    sweep_id = new_id("s-")
    with Leases(session.store).hold("sweep", sweep_id):  # `--resume` by another master is refused meanwhile
        table = SweepTable(session.store)
        sweep = table.create(
            SweepRecord(
                id=sweep_id,
                space=space.to_list(),
                sampler=sampler,
                pruner=pruner,
                n_trials=n_trials,
                seed=seed,
                overrides=overrides,
                base_spec=base_spec,
                preset=preset,
                cluster_id=record.id,
                master_host=socket.gethostname(),
                master_pid=os.getpid(),
            )
        )
        study = studies.create_study(
            session.config.state_dir,
            sweep_id,
            studies.make_sampler(sampler, space, seed, n_trials),
            studies.make_pruner(pruner, n_trials),
        )
        source = SweepSource(study, session.store, sweep_id, space, base_spec, n_trials, record.id, task=task)
        return _drive(session, table, sweep, source, progress)


def resume_sweep(
    session: Session,
    sweep_id: str,
    progress: Optional[ProgressFactory] = None,
    task: Optional[Callable[..., dict]] = None,
) -> SweepResult:
    """Go on with a sweep whose master stopped: running trials from their checkpoints, then new ones."""
    table = SweepTable(session.store)
    sweep = table.get(sweep_id)
    if sweep is None:
        raise UsageError(f"--resume {sweep_id}: no such sweep; `cluster sweeps` lists them")
    if sweep.state == "completed":
        raise UsageError(f"--resume {sweep_id}: the sweep already completed; `cluster results {sweep_id}` shows it")
    with Leases(session.store).hold("sweep", sweep_id):  # refused while another live master drives it
        return _resume(session, table, sweep, progress, task)


def _resume(
    session: Session,
    table: SweepTable,
    sweep: SweepRecord,
    progress: Optional[ProgressFactory],
    task: Optional[Callable[..., dict]],
) -> SweepResult:
    sweep_id = sweep.id
    space = sweep.search_space
    base_spec = base_spec_for_resume(sweep, session.run_spec(**sweep.overrides))
    record = session.record
    study = studies.load_study(
        session.config.state_dir,
        sweep_id,
        studies.make_sampler(sweep.sampler, space, sweep.seed, sweep.n_trials),
        studies.make_pruner(sweep.pruner, sweep.n_trials),
    )
    table.update(
        sweep_id,
        state="running",
        master_host=socket.gethostname(),
        master_pid=os.getpid(),
        cluster_id=record.id,
        finished_at=None,
        error=None,
    )
    sweep = table.get(sweep_id) or sweep
    resumed: list[Job] = []
    settled: list[Job] = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial = optuna.trial.Trial(study, frozen._trial_id)
        job = job_for(trial, session.store, sweep_id, space, base_spec, record.id)
        # epochs the store has but Optuna never heard of (the master died in between)
        for epoch in session.store.epochs.of(job.run_id):
            if epoch.epoch <= job.epochs_done and epoch.epoch not in frozen.intermediate_values:
                trial.report(epoch.val_accuracy, epoch.epoch)
        (settled if job.finished else resumed).append(job)
    source = SweepSource(
        study, session.store, sweep_id, space, base_spec, sweep.n_trials, record.id, resumed=resumed, task=task
    )
    for job in settled:  # trained to the end, but never told
        run = session.store.runs.get(job.run_id)
        if run is not None and run.state != "completed":
            session.store.runs.update(job.run_id, state="completed", finished_at=time.time())
        state = TrialState.PRUNED if job.tag.should_prune() else TrialState.COMPLETE  # as on_result decides
        source.finish(job, state, session.store.runs.get(job.run_id))
    log.info(
        "resuming sweep %s: %d trials from checkpoints, %d told now, %d of %d asked before",
        sweep_id,
        len(resumed),
        len(settled),
        source.asked,
        sweep.n_trials,
    )
    return _drive(session, table, sweep, source, progress)


def base_spec_for_resume(sweep: SweepRecord, current: dict) -> dict:
    """The sweep's own base spec, so later trials train what the first ones did; a [training] edited
    since is reported.  Where and how this cluster trains (data_dir, download, threads) come from now."""
    if not sweep.base_spec:
        log.warning("sweep %s was stored without its base spec; its new trials use the current [training]", sweep.id)
        return current
    changed = sorted(k for k in current if k not in ENVIRONMENT_KEYS and sweep.base_spec.get(k) != current[k])
    if changed:
        log.warning(
            "sweep %s: the current [training] differs from the sweep's (%s); its trials keep the sweep's own values",
            sweep.id,
            ", ".join(f"{k} = {sweep.base_spec.get(k)!r}, now {current[k]!r}" for k in changed),
        )
    return {**sweep.base_spec, **{k: current[k] for k in ENVIRONMENT_KEYS if k in current}}


def _drive(
    session: Session, table: SweepTable, sweep: SweepRecord, source: SweepSource, progress: Optional[ProgressFactory]
) -> SweepResult:
    sink = progress(source) if progress is not None else None
    # one task queued beyond the engines: the master's bookkeeping between a trial's epochs (store,
    # Optuna report / prune / tell) then overlaps with training instead of idling the engine
    scheduler = session.scheduler(prefetch=1)
    started = time.time()
    try:
        if isinstance(sink, contextlib.AbstractContextManager):
            with sink:
                scheduler.run(source, sink)
        else:
            scheduler.run(source, sink)
    except BaseException as error:
        # in-flight trials stay RUNNING in Optuna: `--resume` continues them from their checkpoints
        RunRecorder(session.store).mark_interrupted(job.run_id for job in source.tally.running.values())
        interrupted = isinstance(error, KeyboardInterrupt)
        table.update(
            sweep.id,
            state="interrupted" if interrupted else "failed",
            seconds=sweep.seconds + time.time() - started,
            error=None if interrupted else repr(error),
        )
        if isinstance(error, ClusterLostError):
            raise ClusterLostError(
                f"{error}; sweep {sweep.id} keeps its finished trials and checkpoints: "
                f"{error.way_on}, then `cluster sweep --resume {sweep.id}`",
                error.way_on,
            ) from None
        raise
    makespan = time.time() - started
    table.update(sweep.id, state="completed", finished_at=time.time(), seconds=sweep.seconds + makespan)
    result = results(session, sweep.id)
    result.makespan_s = makespan
    result.dispatch_overheads = list(scheduler.stats.dispatch_overheads)
    result.task_timings = list(scheduler.stats.timings)
    result.engine_losses = scheduler.stats.engine_losses
    return result


def sweeps(session: Session, limit: Optional[int] = None) -> list[SweepResult]:
    """Past sweeps, newest first, each with its ranked trials."""
    records = SweepTable(session.store).all(limit)
    storage = studies.storage(session.config.state_dir) if records else None  # one engine for them all
    return [results(session, record.id, storage) for record in records]


def results(session: Session, sweep_id: str, storage: Optional[optuna.storages.BaseStorage] = None) -> SweepResult:
    """A sweep's ranked trials and best configuration; works with the cluster stopped."""
    sweep = SweepTable(session.store).get(sweep_id)
    if sweep is None:
        raise UsageError(f"no sweep {sweep_id!r}; `cluster sweeps` lists them")
    try:
        study = optuna.load_study(
            storage=storage or studies.storage(session.config.state_dir),
            study_name=sweep_id,
            sampler=optuna.samplers.RandomSampler(),
        )
    except KeyError:
        raise UsageError(
            f"sweep {sweep_id}: its Optuna study is missing from {studies.storage_path(session.config.state_dir)}"
        ) from None
    return collect(session.store, sweep, study)

"""Optuna on the master: the study's storage, and the samplers and pruners a sweep may name.

The study lives in ``STATE_DIR/sweeps.db`` (SQLite beside the store), one study
per sweep named by the sweep id, so a sweep outlives the process that ran it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import optuna
from sqlalchemy import event

from controller.errors import UsageError
from controller.work.sweep.space import SearchSpace

log = logging.getLogger(__name__)

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "asha")

# Optuna's own INFO line per trial would interleave with the live view
optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_path(state_dir: Path) -> Path:
    return Path(state_dir) / "sweeps.db"


def storage(state_dir: Path) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on SQLite, in WAL mode.

    WAL with synchronous=NORMAL survives a killed master (only a power cut can
    lose the last transaction) and makes each report/tell a few ms instead of
    tens: those ms are engine idle time between a trial's tasks.
    """
    url = f"sqlite:///{storage_path(state_dir)}"
    rdb = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}})

    @event.listens_for(rdb.engine, "connect")
    def _pragmas(connection, _record) -> None:  # every new pooled connection
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    rdb.engine.dispose()  # connections opened before the listener reconnect with it
    return rdb


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler, minus its ``study.stop()`` once the grid is covered.

    ``study.stop()`` only works inside ``study.optimize``; under ask-and-tell it
    raises after every last tell.  The sweep asks exactly as many trials as the
    grid has points, so it knows the end without the sampler's help.
    """

    def after_trial(self, study, trial, state, values) -> None:
        return None


def make_sampler(name: str, space: SearchSpace, seed: int, n_trials: int = 20) -> optuna.samplers.BaseSampler:
    if name == "grid":
        return AskTellGridSampler(space.grid(), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        # constant_liar: trials running on other engines count as "bad so far", so parallel
        # engines don't all get the same suggestion.  Random start-up trials: Optuna's 10, but at most a
        # third of a small sweep, or TPE would never get to model anything
        return optuna.samplers.TPESampler(
            seed=seed, constant_liar=True, n_startup_trials=min(10, max(2, n_trials // 3))
        )
    raise UsageError(f"--sampler {name!r}: expected one of {', '.join(SAMPLERS)}")


def make_pruner(name: str, n_trials: int) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        # prune once a quarter of the trials (1 to 5) completed: a median of one trial is noisy,
        # but a small sweep that waits for five never prunes at all
        return optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, n_trials // 4)), n_warmup_steps=0)
    if name == "asha":
        # asynchronous successive halving: rungs at epochs 1, 3, 9, ...; keep the top third
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    raise UsageError(f"--pruner {name!r}: expected one of {', '.join(PRUNERS)}")


def create_study(
    state_dir: Path, sweep_id: str, sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner
) -> optuna.Study:
    return optuna.create_study(
        storage=storage(state_dir), study_name=sweep_id, sampler=sampler, pruner=pruner, direction="maximize"
    )


def load_study(
    state_dir: Path,
    sweep_id: str,
    sampler: Optional[optuna.samplers.BaseSampler] = None,
    pruner: Optional[optuna.pruners.BasePruner] = None,
) -> optuna.Study:
    return optuna.load_study(storage=storage(state_dir), study_name=sweep_id, sampler=sampler, pruner=pruner)

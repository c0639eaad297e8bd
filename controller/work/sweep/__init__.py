"""Hyperparameter and topology sweeps: many trainings of the CNN at once, one per engine.

- ``space``:   ``--param`` specs, search spaces, presets (``paper``)
- ``study``:   Optuna's storage (SQLite beside the store), samplers and pruners
- ``source``:  the scheduler's JobSource that asks, reports, prunes and tells
- ``records``: the ``sweeps`` table and ranked results
- ``view``:    the live view on the master
- ``runner``:  what ``Cluster.sweep`` / ``.sweeps`` / ``.results`` call
"""

from __future__ import annotations

from controller.work.sweep.records import SweepRecord, SweepResult, TrialResult
from controller.work.sweep.space import PRESETS, SWEEPABLE, ParamSpec, SearchSpace, build_space, parse_param

__all__ = [
    "PRESETS",
    "SWEEPABLE",
    "ParamSpec",
    "SearchSpace",
    "SweepRecord",
    "SweepResult",
    "TrialResult",
    "build_space",
    "parse_param",
]

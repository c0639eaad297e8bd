"""How long a local cluster takes to grow, shrink, start and stop, and where the seconds go.

Times, on real local processes (controller, engines, keeper), each in its own timed step:

- ``start --slaves 4`` until every engine registered, was recorded and loaded the data set,
- ``scale 1 -> 4`` (three slaves added) and ``scale 4 -> 1`` (three idle slaves drained and stopped),
- ``stop``,

and splits each into its phases by timing the functions that do the work (wrapped here, for the
measurement only); "waiting for engines to register" is what is left of an add once the launch,
recording and warm-up are counted.

Every absolute time here depends on how loaded the machine is, so ``start`` and ``stop`` are also
compared with the floor ipyparallel itself sets, measured in the same run, round by round beside
ours: plain ``ipyparallel.Cluster(n=4)`` with the same engine launcher (``local``) and the same
engine environment (torch threads, path), ``start_and_connect``, ``wait_for_engines(4)``, then
``import torch`` on every engine (an engine is no use to us before), and ``stop_cluster``; and the
same again with a torch.optim optimizer built after the import, which is what a training run with
plain PyTorch first needs beyond torch (the first optimizer imports torch._dynamo, nearly as long again
as torch; our engines train with engines/optim.py and need no more than torch and our code).
Printed: the medians of the rounds and the ratios ours / baseline.

    python benchmarks/elastic.py              # real MNIST from ../shared/data or $CLUSTER_DATA_DIR
    python benchmarks/elastic.py --json
    python benchmarks/elastic.py --rounds 3   # more rounds of start/stop beside the baseline
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import inspect
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import TypedDict

import ipyparallel
from common import data_dir

from controller.api import Cluster  # noqa: E402
from controller.cluster import (
    joining,
    keeper,  # noqa: E402
    resize,
)
from controller.config import load_config  # noqa: E402
from controller.ipp.profile import engine_environment
from controller.providers import local  # noqa: E402

PHASES = [  # (owner, attribute, phase name)
    (ipyparallel.Cluster, "start_controller", "controller start"),
    (local.LocalProvider, "add", "engine launch (ipyparallel launchers)"),
    (joining, "record_engines", "engines report themselves (engine_info: imports)"),
    (joining, "warm_engines", "engines load the data set (warm-up)"),
    (keeper, "spawn", "keeper spawn"),
    (resize.Resizer, "_drain", "drain (mark, SIGUSR1, wait idle)"),
    (local.LocalProvider, "remove", "engine sets stopped"),
    (local.LocalProvider, "stop", "every engine stopped"),
    (ipyparallel.Cluster, "stop_controller", "controller stop"),
    (keeper, "stop", "keeper stopped"),
]


class Phases:
    """Seconds per phase, for the step being measured (wrappers around the functions above); a phase timed
    inside another (the warm-up inside record_engines) counts for itself only."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._open: list[str] = []
        for owner, name, phase in PHASES:
            setattr(owner, name, self._timed(getattr(owner, name), phase))

    def _timed(self, fn, phase: str):
        if inspect.iscoroutinefunction(fn):  # ipyparallel's *_sync methods call these

            @functools.wraps(fn)
            async def timed_async(*args, **kwargs):
                with self._timing(phase):
                    return await fn(*args, **kwargs)

            return timed_async

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self._timing(phase):
                return fn(*args, **kwargs)

        return wrapper

    @contextlib.contextmanager
    def _timing(self, phase: str):
        started = time.perf_counter()
        self._open.append(phase)
        try:
            yield
        finally:
            self._open.pop()
            seconds = time.perf_counter() - started
            self.seconds[phase] += seconds
            if self._open:
                self.seconds[self._open[-1]] -= seconds

    @contextlib.contextmanager
    def step(self, rows: list, name: str):
        self.seconds.clear()
        started = time.perf_counter()
        yield
        total = time.perf_counter() - started
        parts = dict(self.seconds)
        counted = sum(parts.values())
        parts["the rest (registration waits, store, status)"] = max(0.0, total - counted)
        rows.append(
            {
                "step": name,
                "seconds": round(total, 2),
                "phases": {k: round(v, 2) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
            }
        )


def _import_torch() -> str:
    import torch

    return torch.__version__


def _build_optimizer() -> str:
    """What a plain PyTorch training run does first beyond importing torch: its first torch.optim optimizer
    imports torch._dynamo."""
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    return torch.__version__


BASELINES = {"import torch": _import_torch, "import torch, build an optimizer": _build_optimizer}


def baseline(tmp: Path, name: str, engines: int, threads: int, ready=_import_torch) -> dict[str, float]:
    """Plain ipyparallel: start ``engines`` local engines with our engine environment, wait for them,
    run ``ready`` on each; then stop. Seconds of each."""
    from traitlets.config import Config

    config = Config()
    config.LocalEngineSetLauncher.environment = engine_environment(threads)
    plain = ipyparallel.Cluster(
        n=engines,
        engines="local",
        profile_dir=str(tmp / name),
        cluster_id=name,
        shutdown_atexit=False,
        config=config,
        log_level=logging.WARNING,
        load_profile=False,
    )
    started = time.perf_counter()
    client = plain.start_and_connect_sync()
    try:
        client.wait_for_engines(engines, timeout=300)
        client[:].apply_sync(ready)
        start_s = time.perf_counter() - started
    finally:
        client.close()
        stopping = time.perf_counter()
        plain.stop_cluster_sync()
    return {"start": start_s, "stop": time.perf_counter() - stopping}


class Round(TypedDict):
    """One round of start/stop: our steps' rows, and each baseline's seconds ("start", "stop") by label."""

    ours: list[dict]
    baseline: dict[str, dict[str, float]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of start/stop, each beside the baseline's")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    phases = Phases()
    rounds: list[Round] = []
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        ini = Path(tmp) / "cluster.ini"
        ini.write_text(
            f"[cluster]\nname = bench-elastic\nstate_dir = {tmp}/state\ndata_dir = {data_dir()}\n"
            f"threads_per_engine = {args.threads}\ndownload = false\n"
        )
        ini.chmod(0o600)
        cluster = Cluster(load_config(ini, environ={}))
        try:
            for number in range(args.rounds):
                ours: list[dict] = []
                plain = {
                    label: baseline(Path(tmp), f"baseline-{number}-{i}", 4, args.threads, ready)
                    for i, (label, ready) in enumerate(BASELINES.items())
                }
                with phases.step(ours, "start --slaves 4"):
                    cluster.start(slaves=4)
                with phases.step(ours, "stop (4 slaves)"):
                    cluster.stop()
                rounds.append({"ours": ours, "baseline": plain})
            cluster.start(slaves=1)
            with phases.step(rows, "scale 1 -> 4"):
                cluster.scale(4)
            with phases.step(rows, "scale 4 -> 1"):
                cluster.scale(1)
        finally:
            cluster.stop()
            cluster.close()
    rows[:0] = [median_row([r["ours"][i] for r in rounds]) for i in range(2)]
    ratios = {}
    for row, key in zip(rows, ("start", "stop")):
        row["baselines"] = {}
        for label in BASELINES:
            plain_s = statistics.median(r["baseline"][label][key] for r in rounds)
            row["baselines"][label] = {"seconds": round(plain_s, 2), "ratio": round(row["seconds"] / plain_s, 2)}
            ratios[f"{key} ours/baseline ({label})"] = round(row["seconds"] / plain_s, 2)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{len(rounds)} round(s) of start/stop beside plain ipyparallel (4 local engines, same environment); medians")
    for row in rows:
        print(f"{row['step']:<62} {row['seconds']:6.2f} s")
        for label, plain in row.get("baselines", {}).items():
            print(
                f"    {'baseline: ipyparallel + ' + label:<58} {plain['seconds']:6.2f} s   "
                f"ours/baseline {plain['ratio']:.2f}x"
            )
        for phase, seconds in row["phases"].items():
            if seconds >= 0.005:
                print(f"    {phase:<58} {seconds:6.2f} s")
    print(json.dumps({**{row["step"]: row["seconds"] for row in rows}, **ratios}))


def median_row(rows: list[dict]) -> dict:
    """One step's rounds as one row: the median total, and each phase's median."""
    phases = {name for row in rows for name in row["phases"]}
    medians = {name: round(statistics.median(row["phases"].get(name, 0.0) for row in rows), 2) for name in phases}
    return {
        "step": rows[0]["step"],
        "seconds": round(statistics.median(row["seconds"] for row in rows), 2),
        "phases": dict(sorted(medians.items(), key=lambda kv: -kv[1])),
    }


if __name__ == "__main__":
    main()

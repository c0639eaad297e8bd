"""How long a local cluster takes to grow, shrink, start and stop, and where the seconds go.

Times, on real local processes (controller, engines, keeper), each in its own timed step:

- ``start --slaves 4`` until every engine registered, was recorded and loaded the data set,
- ``scale 1 -> 4`` (three slaves added) and ``scale 4 -> 1`` (three idle slaves drained and stopped),
- ``stop``,

and splits each into its phases by timing the functions that do the work (wrapped here, for the
measurement only); "waiting for engines to register" is what is left of an add once the launch,
recording and warm-up are counted.

    python benchmarks/elastic.py              # real MNIST from ../shared/data or $CLUSTER_DATA_DIR
    python benchmarks/elastic.py --json
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import inspect
import json
import logging
import tempfile
import time
from pathlib import Path

from common import REPO, data_dir

from controller import ipcluster, joining  # noqa: E402
from controller.api import Cluster  # noqa: E402
from controller.config import load_config  # noqa: E402
from controller.elastic import keeper, resize  # noqa: E402
from controller.providers import local  # noqa: E402

PHASES = [  # (owner, attribute, phase name)
    (ipcluster.ipp.Cluster, "start_controller", "controller start"),
    (local.LocalProvider, "add", "engine launch (ipyparallel launchers)"),
    (joining, "record_engines", "engines report themselves (engine_info)"),
    (joining, "warm_engines", "engines load the data set"),
    (keeper, "spawn", "keeper spawn"),
    (resize.Resizer, "_drain", "drain (mark, SIGUSR1, wait idle)"),
    (local.LocalProvider, "remove", "engine sets stopped"),
    (local.LocalProvider, "stop", "every engine stopped"),
    (ipcluster.ipp.Cluster, "stop_controller", "controller stop"),
    (keeper, "stop", "keeper stopped"),
]


class Phases:
    """Seconds per phase, for the step being measured (wrappers around the functions above)."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        for owner, name, phase in PHASES:
            setattr(owner, name, self._timed(getattr(owner, name), phase))

    def _timed(self, fn, phase: str):
        if inspect.iscoroutinefunction(fn):  # ipyparallel's *_sync methods call these
            @functools.wraps(fn)
            async def timed_async(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    self.seconds[phase] += time.perf_counter() - started
            return timed_async

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started
        return wrapper

    @contextlib.contextmanager
    def step(self, rows: list, name: str):
        self.seconds.clear()
        started = time.perf_counter()
        yield
        total = time.perf_counter() - started
        parts = dict(self.seconds)
        counted = sum(parts.values())
        parts["the rest (registration waits, store, status)"] = max(0.0, total - counted)
        rows.append({"step": name, "seconds": round(total, 2),
                     "phases": {k: round(v, 2) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    phases = Phases()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        ini = Path(tmp) / "cluster.ini"
        ini.write_text(f"[cluster]\nname = bench-elastic\nstate_dir = {tmp}/state\ndata_dir = {data_dir()}\n"
                       f"threads_per_engine = {args.threads}\ndownload = false\n")
        ini.chmod(0o600)
        cluster = Cluster(load_config(ini, environ={}))
        try:
            with phases.step(rows, "start --slaves 4"):
                cluster.start(slaves=4)
            with phases.step(rows, "stop (4 slaves)"):
                cluster.stop()
            cluster.start(slaves=1)
            with phases.step(rows, "scale 1 -> 4"):
                cluster.scale(4)
            with phases.step(rows, "scale 4 -> 1"):
                cluster.scale(1)
        finally:
            cluster.stop()
            cluster.close()
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        print(f"{row['step']:<20} {row['seconds']:6.2f} s")
        for phase, seconds in row["phases"].items():
            if seconds >= 0.005:
                print(f"    {phase:<46} {seconds:6.2f} s")
    print(json.dumps({row["step"]: row["seconds"] for row in rows}))


if __name__ == "__main__":
    main()

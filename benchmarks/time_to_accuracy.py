"""Wall seconds to 99.0% test accuracy: `cluster train` on one engine beside a bare script, first run and warm.

The bare script is what a user would write without the cluster: a fresh Python
process that imports torch, loads MNIST, trains the default recipe (Adam, one-cycle,
batch 128, channels-last) for the same epochs on the same threads and tests.
`cluster train --epochs E` is timed around the whole command, as a user runs it:

- the *first run* is the first task the engine sees after `cluster start` returned (start
  warms every engine: the data set loaded and the training code imported, so no run pays
  for that); *warm runs* follow;
- every cluster run is paired with a bare script run just before it, and compared with
  it: the pairs' ratios cancel most of the machine's drift (the first run's pair runs
  between start and it, on the master only, so the engine is still untouched).

Printed: every run, the first-run and warm-run ratios against the bare script, and
where the seconds of each go. Targets: warm <= 1.05x, first run <= 1.05x the warm runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import bare_script, cluster_train, data_dir

TARGET = 0.99


@contextlib.contextmanager
def started_cluster(threads: int):
    """A real 1-engine local cluster; yields (env, start seconds, the engines' warm-up seconds as start logged)."""
    with tempfile.TemporaryDirectory() as tmp:
        ini = Path(tmp) / "bench.ini"
        ini.write_text(f"[cluster]\nname = tta\nslaves = 1\nthreads_per_engine = {threads}\ndownload = false\n")
        env = dict(os.environ, CLUSTER_STATE_DIR=tmp, CLUSTER_DATA_DIR=str(data_dir()), CLUSTER_CONFIG=str(ini))
        t0 = time.perf_counter()
        start = subprocess.run(
            [sys.executable, "-m", "controller", "-v", "start"], env=env, capture_output=True, text=True
        )
        start_s = time.perf_counter() - t0
        try:
            if start.returncode != 0:
                raise SystemExit(f"cluster start failed:\n{start.stderr}")
            warmed = re.search(r"engines loaded the data set in ([\d.]+) s", start.stderr)
            yield env, start_s, float(warmed.group(1)) if warmed else None
        finally:
            subprocess.run([sys.executable, "-m", "controller", "stop"], env=env, capture_output=True)


def cli_startup_s(env: dict) -> float:
    """What a `cluster` command pays before it talks to the cluster: the interpreter, its imports, the parser."""
    program = "import controller.api, controller.cli; controller.cli.build_parser()"
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", program], env=env, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cluster_parts(run: dict, wall: float, startup: float) -> str:
    train = sum(e["train_seconds"] for e in run["epochs"])
    evaluate = sum(e["seconds"] for e in run["epochs"]) - train
    rest = wall - startup - run["seconds"]
    return (
        f"interpreter+imports {startup:.2f} s, engine training {train:.2f} s, engine val+test {evaluate:.2f} s, "
        f"connect/dispatch/result/store {rest:.2f} s"
    )


def bare_parts(bare: dict) -> str:
    return (
        f"interpreter+imports {bare['startup_s']:.2f} s, load MNIST {bare['load_s']:.2f} s, "
        f"training {bare['train_s']:.2f} s, test {bare['test_s']:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="epoch budget of every run (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="warm rounds, each a bare script and a cluster run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    # a `timeout` or a kill still stops the cluster (the context manager's finally runs on SystemExit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    epochs = ("--epochs", str(args.epochs))
    print(
        f"{args.epochs} epoch(s) of 50,000 real MNIST images, {args.threads} torch threads, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before",
        flush=True,
    )
    with started_cluster(args.threads) as (env, start_s, warmed_s):
        print(
            f"cluster start {start_s:.1f} s (engine warm-up inside it: "
            f"{'not logged' if warmed_s is None else f'{warmed_s:.1f} s'})",
            flush=True,
        )
        bares, runs = [], []
        for round_ in range(args.rounds + 1):  # round 0: the first run, nothing ran on the engine before it
            bares.append(bare_script(args.epochs, args.threads))
            runs.append(cluster_train(env, *epochs))
            (run, wall), bare = runs[-1], bares[-1]
            print(
                f"{'first' if round_ == 0 else f'warm {round_}':7s}  bare script {bare['wall_s']:6.2f} s -> "
                f"{bare['test_accuracy']:.2%}   cluster train {wall:6.2f} s -> {run['test_accuracy']:.2%}   "
                f"ratio {wall / bare['wall_s']:.3f}",
                flush=True,
            )
        startup = cli_startup_s(env)
    (first, first_wall), warms = runs[0], runs[1:]
    first_ratio = first_wall / bares[0]["wall_s"]
    warm_ratio = statistics.median(wall / b["wall_s"] for (_, wall), b in zip(warms, bares[1:]))
    bare_wall = statistics.median(b["wall_s"] for b in bares)
    warm_wall = statistics.median(wall for _, wall in warms)
    print(f"load average {os.getloadavg()[0]:.1f} after")
    print("ratio to the bare script run just before it (paired):")
    print(
        f"  first run after start {first_ratio:.3f}   warm runs, median of {len(warms)} {warm_ratio:.3f}  "
        f"(target <= 1.05)"
    )
    print(f"  first run / warm runs {first_ratio / warm_ratio:.3f}  (target <= 1.05: no cold-start tax)")
    print("where the seconds go (a middle bare script and warm run; the first run beside them):")
    middle = sorted(range(len(warms)), key=lambda i: warms[i][1])[len(warms) // 2]
    typical = sorted(bares, key=lambda b: b["wall_s"])[len(bares) // 2]
    print(f"  bare script   {typical['wall_s']:6.2f} s: {bare_parts(typical)}")
    middle_run, middle_wall = warms[middle]
    print(f"  cluster warm  {warm_wall:6.2f} s: {cluster_parts(middle_run, middle_wall, startup)}")
    print(f"  cluster first {first_wall:6.2f} s: {cluster_parts(first, first_wall, startup)}")
    accurate = [
        name
        for name, accuracy in (
            ("bare", bares[-1]["test_accuracy"]),
            ("first", first["test_accuracy"]),
            ("warm", warms[-1][0]["test_accuracy"]),
        )
        if accuracy >= TARGET
    ]
    print(
        f"time to {TARGET:.1%} with a {args.epochs}-epoch budget: "
        + (
            f"bare {bare_wall:.1f} s, cluster warm {warm_wall:.1f} s, first {first_wall:.1f} s"
            if len(accurate) == 3
            else f"reached by {', '.join(accurate) or 'none'} only; try --epochs {args.epochs + 1}"
        )
    )


if __name__ == "__main__":
    main()

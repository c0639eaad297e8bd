"""Memory of the master and the controller over a long sweep: flat, not growing with every task.

Every task's result carries a checkpoint (~1 MB for the paper's CNN with Adam's state). ipyparallel's
client keeps every result it received and its controller's in-memory task database keeps every
task's arguments and result, so with ipyparallel's defaults both grow with the work. This runs the
same sweep twice on 2 local engines, each in a fresh process, on a small synthetic data set (the memory,
not the training, is measured):

- baseline: ipyparallel's defaults (the controller's DictDB, the client keeping results),
- ours: the controller without a task database, the scheduler forgetting each result once stored
  (and collecting the reference cycles that hold finished results every 32 MB of them),

and prints the resident memory (RSS) of the master (this process) and of the controller (its
processes: hub and schedulers) as the first task leaves (the sweep set up: study, storage, imports),
after 100 and after all tasks.
Target: ours grows by at most 50 MB from 0 to 500 tasks, in the master and in the controller.

    python benchmarks/memory.py                      # 50 trials x 10 epochs = 500 tasks per configuration
    python benchmarks/memory.py --trials 20          # shorter
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import psutil
from common import REPO

sys.path.insert(0, str(REPO))

from controller.api import Cluster  # noqa: E402
from controller.config import load_config  # noqa: E402
from controller.ipp.launch import CONTROLLER_ARGS
from controller.work.jobs import ProgressSink  # noqa: E402
from controller.work.scheduler import Scheduler  # noqa: E402
from engines.data import write_synthetic_mnist  # noqa: E402

MB = 1024 * 1024
TARGET_GROWTH_MB = 50


def rss_mb(pid: int, with_children: bool = False) -> float:
    process = psutil.Process(pid)
    processes = [process, *process.children(recursive=True)] if with_children else [process]
    return sum(p.memory_info().rss for p in processes if p.is_running()) / MB


class MemorySampler(ProgressSink):
    """Samples master and controller RSS when the sweep has finished the given numbers of tasks."""

    def __init__(self, controller_pid: int, at: tuple[int, ...]):
        self.controller_pid, self.at, self.done = controller_pid, set(at), 0
        self.samples: dict[int, tuple[float, float]] = {}

    def sample(self, tasks: int) -> None:
        self.samples[tasks] = (rss_mb(psutil.Process().pid), rss_mb(self.controller_pid, with_children=True))

    def task_submitted(self, job) -> None:
        if 0 not in self.samples:  # the sweep is set up (study, storage, imports) and its first task leaves
            self.sample(0)

    def task_done(self, job, result, engine_id) -> None:
        self.done += 1
        if self.done in self.at:
            self.sample(self.done)


@contextmanager
def ipyparallel_defaults():
    """The baseline: the controller with its default task database, the client keeping every result."""
    args, forget = CONTROLLER_ARGS[:], Scheduler._forget
    CONTROLLER_ARGS[:] = [a for a in args if "db_class" not in a]
    Scheduler._forget = lambda self, result, size: None
    try:
        yield
    finally:
        CONTROLLER_ARGS[:], Scheduler._forget = args, forget


def measure(tmp: Path, data: Path, trials: int, epochs: int, label: str) -> dict:
    state = tmp / label
    ini = tmp / f"{label}.ini"
    ini.write_text(
        f"[cluster]\nname = bench-memory\nslaves = 2\nstate_dir = {state}\ndata_dir = {data}\n"
        f"threads_per_engine = 1\ndownload = false\n"
    )
    cluster = Cluster(load_config(ini, environ={}))
    cluster.start()
    try:
        total = trials * epochs
        sampler = MemorySampler(cluster.status().controller["pid"], at=(100, total))
        cluster.sweep(
            {"lr": "log:0.0005:0.01"}, trials=trials, sampler="random", epochs=epochs, progress=lambda source: sampler
        )
    finally:
        cluster.stop()
        cluster.close()
    return {"label": label, "tasks": sampler.done, "samples": sampler.samples}


def measure_in_a_fresh_process(label: str, trials: int, epochs: int) -> dict:
    """One configuration in its own interpreter: the other's heap never counts against it."""
    output = subprocess.run(
        [sys.executable, __file__, "--trials", str(trials), "--epochs", str(epochs), "--only", label],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    run = json.loads(output.strip().splitlines()[-1])
    run["samples"] = {int(tasks): tuple(values) for tasks, values in run["samples"].items()}
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=10, help="epochs (= tasks) per trial")
    parser.add_argument("--only", choices=("baseline", "ours"), help=argparse.SUPPRESS)  # one configuration, JSON out
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.only:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            data = write_synthetic_mnist(tmp / "data", n_train=600, n_test=100)
            if args.only == "baseline":
                with ipyparallel_defaults():
                    run = measure(tmp, data, args.trials, args.epochs, "baseline")
            else:
                run = measure(tmp, data, args.trials, args.epochs, "ours")
        print(json.dumps(run))
        return
    baseline = measure_in_a_fresh_process("baseline", args.trials, args.epochs)
    ours = measure_in_a_fresh_process("ours", args.trials, args.epochs)

    total = args.trials * args.epochs
    print(
        f"{args.trials} trials x {args.epochs} epochs = {total} tasks on 2 local engines, each result carrying "
        f"a ~1 MB checkpoint (paper CNN + Adam state); RSS in MB, each configuration in a fresh process"
    )
    print(
        f"{'configuration':<34}{'process':<12}{'0 tasks':>9}{'100':>9}{total:>9}{'growth':>9}{'100->' + str(total):>10}"
    )
    growth = {}
    for run in (baseline, ours):
        name = "ipyparallel defaults (baseline)" if run["label"] == "baseline" else "ours (NoDB, results purged)"
        for column, process in enumerate(("master", "controller")):
            values = [run["samples"].get(n, (float("nan"),) * 2)[column] for n in (0, 100, total)]
            growth[(run["label"], process)] = values[-1] - values[0]
            print(
                f"{name:<34}{process:<12}"
                + "".join(f"{v:9.0f}" for v in values)
                + f"{values[-1] - values[0]:+9.0f}{values[-1] - values[1]:+10.0f}"
            )
    for process in ("master", "controller"):
        ours_growth, base_growth = growth[("ours", process)], growth[("baseline", process)]
        verdict = "met" if ours_growth <= TARGET_GROWTH_MB else "NOT met"
        print(
            f"{process}: grows {ours_growth:+.0f} MB over {total} tasks (baseline {base_growth:+.0f} MB); "
            f"target <= {TARGET_GROWTH_MB} MB -> {verdict}"
        )
    print(
        json.dumps(
            {
                "tasks": total,
                **{f"{label}_{process}_growth_mb": round(value, 1) for (label, process), value in growth.items()},
            }
        )
    )


if __name__ == "__main__":
    main()

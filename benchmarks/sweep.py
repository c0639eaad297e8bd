"""Aggregate throughput of a sweep: the paper's preset on k local engines, real MNIST.

Prints, in one run:
- the sweep's makespan against the sum of its trials' engine seconds divided by k
  (what perfect load balancing would give; target: within 10%),
- the median dispatch overhead per task: how long its engine sat idle before it started (target <= 10 ms),
- aggregate epochs/min next to the paper's 14.59 epochs/min on 8 GPU servers.

    python benchmarks/sweep.py                       # 2 engines x 1 thread, 10,000 images, 3 epochs
    python benchmarks/sweep.py --engines 4 --subset 0 --epochs 5
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, data_dir

sys.path.insert(0, str(REPO))

from controller.api import Cluster  # noqa: E402
from controller.config import load_config  # noqa: E402

PAPER_EPOCHS_PER_MIN = 14.59  # the paper: the lambda sweep on 8 GPU servers
FULL_EPOCH = 50_000  # training images in one full MNIST epoch


def warm(data: str) -> int:
    """Load MNIST on an engine before the clock starts, as a running cluster has (engines keep it)."""
    from pathlib import Path

    from engines.data import load_mnist

    return len(load_mnist(Path(data)).train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    parser.add_argument("--epochs", type=int, default=3, help="epoch budget of every trial")
    parser.add_argument("--subset", type=int, default=10_000, help="training images per epoch (0 = all 50,000)")
    parser.add_argument("--preset", default="paper")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = data_dir()
    with tempfile.TemporaryDirectory() as tmp:
        ini = Path(tmp) / "cluster.ini"
        ini.write_text(
            f"[cluster]\nname = bench-sweep\nslaves = {args.engines}\nstate_dir = {tmp}/state\n"
            f"data_dir = {data}\nthreads_per_engine = {args.threads}\ndownload = false\n"
        )
        cluster = Cluster(load_config(ini, environ={}))
        cluster.start()
        try:
            cluster.client[:].apply_sync(warm, str(data))
            result = cluster.sweep(preset=args.preset, epochs=args.epochs, subset=args.subset)
        finally:
            cluster.stop()
            cluster.close()

    k = args.engines
    trials = result.trials
    engine_seconds = sum(t.seconds for t in trials)
    ideal = engine_seconds / k
    makespan = result.makespan_s
    epochs = sum(t.epochs_done for t in trials)
    images = args.subset or FULL_EPOCH
    overheads = sorted(result.dispatch_overheads)
    rate = epochs / (makespan / 60)
    print(
        f"sweep {result.sweep_id}: preset {args.preset}, {len(trials)} trials x {args.epochs} epochs of "
        f"{images:,} images, on {k} local CPU engines x {args.threads} thread(s), real MNIST"
    )
    counts, best = result.counts(), result.best
    best_text = (
        f"best l1={best.params.get('l1')}: val {best.val_accuracy:.2%}, test {best.test_accuracy:.2%}"
        if best
        else "no trial completed"
    )
    print(f"  {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed; {best_text}")
    print(f"makespan                         {makespan:8.1f} s")
    print(f"sum of trial times / {k}            {ideal:8.1f} s   (sum {engine_seconds:.1f} s of engine time)")
    print(f"makespan / ideal                 {makespan / ideal:8.3f}    (target <= 1.10)")
    print(
        f"dispatch overhead per task       {statistics.median(overheads) * 1e3:8.1f} ms median, "
        f"{overheads[int(0.9 * (len(overheads) - 1))] * 1e3:.1f} ms p90 over {len(overheads)} tasks "
        f"(engine idle before a task: submitted or engine free, whichever is later, -> start; "
        f"target <= 10 ms)"
    )
    busy: dict = {}
    gaps: list[float] = []
    last: dict = {}
    for engine, _submitted, started, completed in sorted(result.task_timings, key=lambda t: t[2]):
        busy[engine] = busy.get(engine, 0.0) + completed - started
        if engine in last:
            gaps.append(started - last[engine])
        last[engine] = completed
    if busy:
        task_seconds = sum(busy.values())
        print(
            f"  where the rest goes: tasks on engines {task_seconds:.1f} s ({task_seconds - engine_seconds:.1f} s "
            f"outside the epochs: model build, checkpoint in/out); engine idle between tasks "
            f"{statistics.median(gaps) * 1e3:.0f} ms median, {max(gaps) * 1e3:.0f} ms max, {sum(gaps):.1f} s in all; "
            f"busy per engine " + ", ".join(f"{e}: {b:.1f} s" for e, b in sorted(busy.items()))
        )
    print(
        f"aggregate throughput             {rate:8.2f} epochs/min of {images:,} images "
        f"= {rate * images / FULL_EPOCH:.2f} full-epoch equivalents/min"
    )
    print(f"paper (8 GPU servers)            {PAPER_EPOCHS_PER_MIN:8.2f} epochs/min")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"(benchmark wall time {time.perf_counter() - start:.0f} s)")

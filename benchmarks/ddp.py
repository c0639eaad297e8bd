"""Data-parallel training: one epoch on 2 engines vs 1 at the same global batch, beside plain PyTorch.

On one local 2-engine cluster (1 torch thread per engine) it interleaves, per round:
- the bare loop (benchmarks/common.py) with 1 thread and with 2 threads: plain PyTorch in this process,
  the best single-process use of one core and of both;
- `cluster train` on one engine (1 thread);
- `cluster train --distributed --engines 0` (DDP machinery on one engine: its own overhead);
- `cluster train --distributed` on both engines (global batch 128 = 2 x 64).
Prints training images/s of each (median over rounds), the speedup of 2 engines over 1, and the
ratio against the 2-thread bare loop, which uses the same two cores without any communication.
"""

from __future__ import annotations

import argparse
import statistics

from common import bare_loop, cluster_train, local_cluster

PAPER_EPOCH_IMAGES = 50_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    epochs = ["--epochs", str(args.epochs)]
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "bare, 1 thread",
            "bare, 2 threads",
            "cluster train, 1 engine",
            "distributed, 1 engine",
            "distributed, 2 engines",
        )
    }
    accuracy: dict[str, float] = {}
    with local_cluster(2, 1) as env:
        cluster_train(env, "--epochs", "1", "--subset", "2000", "--distributed")  # warm both engines
        bare_loop(epochs=1, threads=1)
        for round_ in range(1, args.rounds + 1):
            for name, threads in (("bare, 1 thread", 1), ("bare, 2 threads", 2)):
                result = bare_loop(epochs=args.epochs, threads=threads)
                rows[name].append(result["images_per_s"])
                accuracy[name] = result["test_accuracy"]
            for name, extra in (
                ("cluster train, 1 engine", []),
                ("distributed, 1 engine", ["--distributed", "--engines", "0"]),
                ("distributed, 2 engines", ["--distributed"]),
            ):
                run, _ = cluster_train(env, *epochs, *extra)
                rows[name].append(run["images_per_s"])
                accuracy[name] = run["test_accuracy"]
            print(f"round {round_}: " + "   ".join(f"{k} {v[-1]:,.0f}" for k, v in rows.items()), flush=True)
    median = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"\nmedian training images/s over {args.rounds} rounds, {args.epochs} epoch(s) of 50,000 images, "
        f"global batch 128:"
    )
    for name, value in median.items():
        print(
            f"  {name:<26} {value:>8,.0f} images/s  {value * 60 / PAPER_EPOCH_IMAGES:6.2f} epochs/min  "
            f"test accuracy {accuracy[name]:.2%}"
        )
    one, two = median["cluster train, 1 engine"], median["distributed, 2 engines"]
    print(
        f"speedup, 2 engines over 1 (same global batch): {two / one:.2f}x "
        f"(over distributed on 1 engine: {two / median['distributed, 1 engine']:.2f}x)"
    )
    print(
        f"distributed on 2 engines / bare loop on 2 threads: {two / median['bare, 2 threads']:.2f}x; "
        f"bare 2 threads / bare 1 thread: {median['bare, 2 threads'] / median['bare, 1 thread']:.2f}x"
    )


if __name__ == "__main__":
    main()

"""Wall seconds to 99.0% test accuracy: `cluster train` (one engine, 2 threads) beside a bare loop.

Both use the default recipe (Adam, one-cycle, batch 128). The epoch budget grows
(1, 2, 3 ...) until a run ends at >= 99.0%; the time reported is that run's, for
the cluster measured around the whole `cluster train` command. Target: <= 12 s on 2 cores.
"""
from __future__ import annotations

import argparse

from common import bare_loop, cluster_train, one_engine_cluster

TARGET = 0.99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with one_engine_cluster(args.threads) as env:
        cluster_train(env, "--epochs", "1", "--subset", "2000")  # warm-up: the engine loads the data once
        bare_loop(epochs=1, threads=args.threads)
        reached: dict[str, tuple[int, float]] = {}
        for epochs in range(1, args.max_epochs + 1):
            bare = bare_loop(epochs=epochs, threads=args.threads)
            run, wall = cluster_train(env, "--epochs", str(epochs))
            print(f"budget {epochs} epoch(s): bare loop {bare['seconds']:.1f} s -> {bare['test_accuracy']:.2%}   "
                  f"cluster train {wall:.1f} s (engine {run['seconds']:.1f} s) -> {run['test_accuracy']:.2%}", flush=True)
            if bare["test_accuracy"] >= TARGET:
                reached.setdefault("bare", (epochs, bare["seconds"]))
            if run["test_accuracy"] >= TARGET:
                reached.setdefault("cluster", (epochs, wall))
            if len(reached) == 2:
                break
    for name in ("cluster", "bare"):
        if name in reached:
            epochs, seconds = reached[name]
            print(f"time to {TARGET:.1%}: {name:7s} {seconds:5.1f} s  ({epochs}-epoch budget)")
        else:
            print(f"time to {TARGET:.1%}: {name:7s} not reached within {args.max_epochs} epochs")
    if len(reached) == 2:
        print(f"ratio cluster/bare = {reached['cluster'][1] / reached['bare'][1]:.2f}; "
              f"target: cluster <= 12 s -> {'met' if reached['cluster'][1] <= 12 else 'missed'}")


if __name__ == "__main__":
    main()

"""Throughput of one epoch: a bare in-process PyTorch loop vs `cluster train` on one engine, same threads.

Interleaves the two (bare, cluster, bare, cluster, ...) so machine noise hits both alike, and
prints images/s of each round, the median of the rounds' ratios (the paired figure: each round's
two runs ran back to back) and the ratio of the medians. Target: cluster >= 0.95x bare.
"""

from __future__ import annotations

import argparse
import statistics

from common import bare_loop, cluster_train, one_engine_cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bare, cluster = [], []
    with one_engine_cluster(args.threads) as env:
        cluster_train(env, "--epochs", "1", "--subset", "2000")  # warm the engine: data loaded, kernels built
        bare_loop(epochs=1, threads=args.threads)  # and the same warm-up for the bare loop
        for round_ in range(1, args.rounds + 1):
            bare.append(bare_loop(epochs=1, threads=args.threads)["images_per_s"])
            run, _ = cluster_train(env, "--epochs", "1")
            cluster.append(run["images_per_s"])
            print(
                f"round {round_}: bare {bare[-1]:,.0f} img/s   cluster train {cluster[-1]:,.0f} img/s   "
                f"ratio {cluster[-1] / bare[-1]:.3f}",
                flush=True,
            )
    b, c = statistics.median(bare), statistics.median(cluster)
    # each round's two runs ran back to back, so their ratio cancels most of the machine's drift
    paired = statistics.median(x / y for x, y in zip(cluster, bare))
    print(f"median over {args.rounds} rounds, {args.threads} threads, one epoch of 50,000 images:")
    print(f"  bare loop      {b:,.0f} images/s")
    print(f"  cluster train  {c:,.0f} images/s")
    print(
        f"  ratio cluster/bare: median of the rounds' ratios {paired:.3f}, ratio of the medians {c / b:.3f}"
        f"  (target >= 0.95)"
    )


if __name__ == "__main__":
    main()

"""How big an evaluation batch the MNIST CNN wants on a CPU: the engines' choice against 1000 a batch.

An epoch of the default recipe evaluates the validation and the test split (10,000 images each) after
training; on one CPU thread that is half the time of a 10,000-image epoch (a sweep trial of the paper
preset). Each round evaluates both splits with engines.loop.accuracy at the batch the engines use on a
CPU (``mnist_eval_batch``) and at 1000 (what engines used before, and what a GPU gets), alternating, in
this process, on 1 and on 2 threads; printed: the medians and the median of the paired ratios.

    python benchmarks/eval_batch.py
    python benchmarks/eval_batch.py --rounds 7 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import data_dir

from engines.data import load_mnist, normalise
from engines.loop import EVAL_BATCH, accuracy
from engines.workloads.cnn import MnistCNN
from engines.workloads.mnist import mnist_eval_batch


def evaluate(model: MnistCNN, splits, batch: int) -> tuple[float, list[float]]:
    started = time.perf_counter()
    accuracies = [accuracy(model, split, normalise, batch) for split in splits]
    return time.perf_counter() - started, accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    data = load_mnist(data_dir())
    splits = (data.val, data.test)
    ours = mnist_eval_batch(torch.device("cpu"))
    torch.manual_seed(0)
    model = MnistCNN().to(memory_format=torch.channels_last)
    result = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        evaluate(model, splits, ours)  # the first pass allocates: not counted
        rounds = []
        for _ in range(args.rounds):
            (mine, mine_acc), (theirs, theirs_acc) = (evaluate(model, splits, batch) for batch in (ours, EVAL_BATCH))
            assert mine_acc == theirs_acc, (mine_acc, theirs_acc)  # the batch changes the speed, not the answer
            rounds.append((mine, theirs))
        result[f"{threads} thread{'s' if threads > 1 else ''}"] = {
            f"batch {ours} s": round(statistics.median(m for m, _ in rounds), 3),
            f"batch {EVAL_BATCH} s": round(statistics.median(t for _, t in rounds), 3),
            "ratio": round(statistics.median(m / t for m, t in rounds), 3),
        }
    if args.json:
        print(json.dumps(result))
        return
    images = sum(len(split) for split in splits)
    print(
        f"evaluating {images:,} MNIST images (validation + test), median of {args.rounds} rounds "
        f"(ratio: median of the paired rounds)"
    )
    print(f"  {'':10} {f'batch {ours}':>11} {f'batch {EVAL_BATCH}':>11} {f'{ours}/{EVAL_BATCH}':>10}")
    for label, row in result.items():
        values = list(row.values())
        print(f"  {label:10} {values[0]:>10.2f}s {values[1]:>10.2f}s {values[2]:>9.2f}x")


if __name__ == "__main__":
    main()

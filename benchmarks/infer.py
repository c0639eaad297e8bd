"""Batch inference: images/s of `cluster infer` on 1 and 2 engines vs one in-process loop.

Trains one small model on a local 2-engine cluster (1 torch thread per engine), then predicts
the 50,000-image training split, interleaving per round:
- the in-process loop (engines.predict.predict: model, normalise, softmax in batches of 250 on a CPU;
  plain PyTorch, the work each shard does) with 1 and with 2 threads;
- `cluster infer --engines 0` and `--engines 0,1` (the model already kept on the engines: the
  first call, which sends the checkpoint, is run before the rounds and shown apart).
images/s of `cluster infer` is the API's own figure (first shard sent to last prediction back),
not counting the CLI's start-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import cluster_json, cluster_train, data_dir, local_cluster

from controller.store import Store  # noqa: E402 - common put the repository on the path
from engines.data import load_mnist  # noqa: E402
from engines.predict import (
    build,  # noqa: E402
    predict,
)


def in_process(checkpoint: bytes, images: torch.Tensor, threads: int) -> float:
    torch.set_num_threads(threads)
    model = build(checkpoint, "cpu")
    started = time.perf_counter()
    predict(model, images)
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    args = parser.parse_args()
    images = getattr(load_mnist(data_dir()), args.split).images
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "in-process, 1 thread",
            "in-process, 2 threads",
            "cluster infer, 1 engine",
            "cluster infer, 2 engines",
        )
    }
    with local_cluster(2, 1) as env:
        run, _ = cluster_train(env, "--epochs", "1", "--subset", "5000")
        with Store(Path(env["CLUSTER_STATE_DIR"])) as store:
            stored = store.checkpoints.load(run["id"])
        assert stored is not None, "the training run stored no checkpoint"
        _, checkpoint = stored
        infer = ["--run", run["id"], "--split", args.split]
        first, _ = cluster_json(env, "infer", *infer)
        print(
            f"first call (checkpoint sent to both engines, data loaded): {first['images_per_s']:,.0f} images/s, "
            f"accuracy {first['accuracy']:.2%}"
        )
        for round_ in range(1, args.rounds + 1):
            rows["in-process, 1 thread"].append(in_process(checkpoint, images, 1))
            rows["in-process, 2 threads"].append(in_process(checkpoint, images, 2))
            for name, engines in (("cluster infer, 1 engine", "0"), ("cluster infer, 2 engines", "0,1")):
                summary, _ = cluster_json(env, "infer", *infer, "--engines", engines)
                rows[name].append(summary["images_per_s"])
            print(f"round {round_}: " + "   ".join(f"{k} {v[-1]:,.0f}" for k, v in rows.items()), flush=True)
    median = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\nmedian images/s over {args.rounds} rounds, {len(images):,} {args.split} images:")
    for name, value in median.items():
        print(f"  {name:<26} {value:>9,.0f} images/s")
    two, one = median["cluster infer, 2 engines"], median["cluster infer, 1 engine"]
    print(
        f"2 engines / 1 engine: {two / one:.2f}x;  2 engines / in-process 1 thread: "
        f"{two / median['in-process, 1 thread']:.2f}x;  2 engines / in-process 2 threads: "
        f"{two / median['in-process, 2 threads']:.2f}x"
    )


if __name__ == "__main__":
    main()

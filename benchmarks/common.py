"""Shared by the benchmarks: a bare PyTorch loop of the default recipe, and a throwaway 1-engine cluster."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engines.data import load_mnist, normalise  # noqa: E402
from engines.workloads.cnn import MnistCNN  # noqa: E402


def data_dir() -> Path:
    for candidate in (os.environ.get("CLUSTER_DATA_DIR"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return Path(candidate)
    sys.exit("benchmarks need real MNIST: set CLUSTER_DATA_DIR (e.g. ../shared/data)")


def bare_loop(epochs: int = 1, threads: int = 2, lr: float = 0.01, batch_size: int = 128, seed: int = 0) -> dict:
    """The default recipe written as a plain loop: Adam, one-cycle, batch 128, channels-last; no cluster code.

    ``seconds`` is training and testing (the data already loaded); ``load_s``, ``train_s`` and ``test_s``
    are the parts, for benchmarks that say where the seconds go."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    data = load_mnist(data_dir())
    load_s = time.perf_counter() - t0
    torch.manual_seed(seed)
    model = MnistCNN().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = -(-len(data.train) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps, pct_start=0.25, cycle_momentum=False
    )
    started = time.perf_counter()
    train_seconds = 0.0
    accuracy = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        t0 = time.perf_counter()
        for step in range(steps):
            index = order[step * batch_size : (step + 1) * batch_size]
            loss = F.nll_loss(model(normalise(data.train.images[index])), data.train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        train_seconds += time.perf_counter() - t0
        model.eval()
        with torch.inference_mode():
            batch = 250  # the fastest on a CPU (benchmarks/eval_batch.py), as the engines use
            correct = sum(
                (model(normalise(data.test.images[i : i + batch])).argmax(1) == data.test.labels[i : i + batch])
                .sum()
                .item()
                for i in range(0, len(data.test), batch)
            )
        accuracy = correct / len(data.test)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "images_per_s": epochs * len(data.train) / train_seconds,
        "test_accuracy": accuracy,
        "load_s": load_s,
        "train_s": train_seconds,
        "test_s": seconds - train_seconds,
    }


def bare_script(epochs: int = 1, threads: int = 2) -> dict:
    """The bare loop as a user's own script: a fresh interpreter that imports torch, loads MNIST, trains and
    tests; ``wall_s`` around the whole process, ``startup_s`` = what the interpreter and imports took."""
    program = (
        f"import json, sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); "
        f"from common import bare_loop; print(json.dumps(bare_loop(epochs={epochs}, threads={threads})))"
    )
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    measured = json.loads(result.stdout)
    return {**measured, "wall_s": wall, "startup_s": wall - measured["load_s"] - measured["seconds"]}


@contextlib.contextmanager
def one_engine_cluster(threads: int = 2):
    """A real local cluster of one engine with ``threads`` torch threads, in a temporary state_dir."""
    with local_cluster(1, threads) as env:
        yield env


@contextlib.contextmanager
def local_cluster(slaves: int, threads: int):
    """A real local cluster of ``slaves`` engines with ``threads`` torch threads each, in a temporary state_dir."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, CLUSTER_STATE_DIR=tmp, CLUSTER_DATA_DIR=str(data_dir()))
        ini = Path(tmp) / "bench.ini"
        ini.write_text(
            f"[cluster]\nname = bench\nslaves = {slaves}\nthreads_per_engine = {threads}\ndownload = false\n"
        )
        env["CLUSTER_CONFIG"] = str(ini)
        subprocess.run([sys.executable, "-m", "controller", "start"], env=env, check=True, capture_output=True)
        try:
            yield env
        finally:
            subprocess.run([sys.executable, "-m", "controller", "stop"], env=env, capture_output=True)


def cluster_train(env: dict, *args: str) -> tuple[dict, float]:
    """`cluster train ... --json` as a user runs it; returns the run record and its wall seconds."""
    return cluster_json(env, "train", *args)


def cluster_json(env: dict, command: str, *args: str) -> tuple[dict, float]:
    """`cluster COMMAND ... --json` as a user runs it; returns what it printed and its wall seconds."""
    t0 = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "controller", command, "--json", *args], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"cluster {command} failed:\n{result.stderr}")
    return json.loads(result.stdout), seconds

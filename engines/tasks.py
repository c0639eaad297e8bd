"""The functions the master sends to engines (by reference: engines import this package).

They return plain data (dicts, bytes) so results cross ZeroMQ without pickling
classes, and import torch only when they run, so the master can name them
without paying for torch.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import socket
from typing import Optional, Union

from engines.process import startup


def _in_engine() -> bool:
    """True inside an ipyparallel engine, where datapub can reach the master."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "data_pub", None) is not None  # set by ipyparallel's engine kernel


def _publish(update: dict) -> None:
    """Stream progress to the master (ipyparallel's datapub)."""
    from ipyparallel.datapub import publish_data

    # every key every time: the client merges publications into one dict
    update = {"epoch": None, "epochs": None, "batch": None, "batches": None, "loss": None, "done": None, **update}
    update["pid"] = os.getpid()
    publish_data({"progress": update})


def train_task(spec: dict, checkpoint: Union[bytes, dict, None], n_epochs: Optional[int]) -> dict:
    """Train ``n_epochs`` of a run from ``checkpoint`` (bytes, or a reference to one this engine keeps:
    engines/held.py), or until ``task_seconds`` or a stop request; returns TaskResult as a dict."""
    from engines.workloads.mnist import train_epochs

    result = train_epochs(spec, checkpoint, n_epochs, progress=_publish if _in_engine() else None)
    return dataclasses.asdict(result)


def engine_info(threads: int = 0) -> dict:
    """Who this engine is: host, pid, device, threads, versions (also sets the thread count)."""
    startup.wait()  # the import of torch this engine began when it started (engines/process/startup.py)
    import torch

    from engines.loop import pick_device
    from engines.process import stopping

    stopping.install()  # before the master may ever drain this engine (SIGUSR1 would end it otherwise)
    if threads:
        torch.set_num_threads(threads)
    device = pick_device("auto")
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        # plain str: torch.__version__ is torch's TorchVersion, and unpickling one makes the master import torch
        "torch": str(torch.__version__),
        "cuda": str(torch.version.cuda or ""),
        "cpu": platform.processor() or platform.machine(),
    }


def cifar_task(spec: dict, checkpoint: Union[bytes, dict, None], n_epochs: Optional[int]) -> dict:
    """A CIFAR-10 run (VGG16 or ResNet18, ``spec["model"]``); the contract of ``train_task``."""
    from engines.workloads.cifar import train_cifar

    return dataclasses.asdict(train_cifar(spec, checkpoint, n_epochs, progress=_publish if _in_engine() else None))


def hardware_info(threads: int = 0) -> dict:
    """``engine_info`` plus what a benchmark names: the GPU, or else the CPU's model name."""
    info = engine_info(threads)
    info["gpu"] = info["device"].split(":", 1)[1] if info["device"].startswith("cuda:") else ""
    try:  # platform.processor() is often empty on Linux; /proc/cpuinfo has the marketing name
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    return info


def warm_up(spec: dict, kind: str = "mnist") -> float:
    """Load a run's data set into this engine's cache and import the training code; returns seconds.

    A benchmark calls this on every engine before its clock starts, so an engine that
    joins at a larger engine count does not pay for loading what the others already hold.
    """
    import time
    from pathlib import Path

    startup.wait()
    started = time.perf_counter()
    if kind == "cifar":
        from engines.workloads.cifar import load_cifar10

        load_cifar10(Path(spec["data_dir"]))
    else:
        from engines.data import load_mnist
        from engines.loop import run_task
        from engines.workloads.mnist import RunSpec, mnist_setup

        data = load_mnist(Path(spec["data_dir"]), bool(spec.get("download", False)))
        # two real batches and one evaluation at the run's shapes and threads: torch builds its CPU kernels
        # (oneDNN primitives) on their first use, which cost the first run after `start` seconds more than
        # the next; a throwaway run id, nothing kept on the engine
        batch = int(spec.get("batch_size") or 128)
        warm = RunSpec.from_dict(
            {
                **spec,
                "run_id": "warm-up",
                "epochs": 1,
                "subset": 2 * batch,
                "task_seconds": 0.0,
                "checkpoint_minutes": 0.0,
            }
        )

        def setup(device):
            work = mnist_setup(warm, device, data)
            work.val, work.test = (_one_of_each_batch(split, work.eval_batch) for split in (work.val, work.test))
            return work

        run_task(warm, setup)
    return time.perf_counter() - started


def _one_of_each_batch(split, batch: int):
    """The first images of ``split`` that make one evaluation batch of each shape the whole split has: a
    full one and the last, partial one (kernels are built per shape; evaluating the rest builds none)."""
    from engines.data import Split

    n = min(len(split), batch + len(split) % batch)
    return Split(split.images[:n], split.labels[:n])


def task_for(spec: dict):
    """The task function that trains runs of this spec (CIFAR specs name their ``model``)."""
    return cifar_task if spec.get("model") else train_task


def distributed_task(
    spec: dict, checkpoint: Optional[bytes], n_epochs: Optional[int], rendezvous: dict, hold: Optional[dict] = None
) -> dict:
    """This engine's rank of a data-parallel task (engines/ddp.py); rank 0 reports progress."""
    from engines.ddp import train_ranked

    return train_ranked(spec, checkpoint, n_epochs, rendezvous, progress=_publish if _in_engine() else None, hold=hold)


def rendezvous_port(toward: str = "") -> dict:
    """A free port on this engine's host for a distributed run's rendezvous, with the host's address."""
    from engines.ddp import free_port

    return free_port(toward)


def load_model_task(key: str, checkpoint: Optional[bytes], device: str = "auto", threads: int = 0) -> dict:
    """Keep a trained model on this engine for inference (engines/predict.py); None only asks if it is here."""
    from engines.predict import load_model

    return load_model(key, checkpoint, device, threads)


def split_size_task(kind: str, data_dir: str, split: str) -> int:
    from engines.predict import split_of

    return len(split_of(kind, data_dir, split))


def infer_task(key: str, kind: str, data_dir: str, split: str, start: int, stop: int) -> dict:
    """Predictions for images ``start:stop`` of a split with a model ``load_model_task`` kept here."""
    from ipyparallel.datapub import publish_data

    from engines.predict import predict_shard

    progress = (lambda update: publish_data({"infer": update})) if _in_engine() else None
    return predict_shard(key, kind, data_dir, split, start, stop, progress)

"""Training on an engine: a run is a chain of short tasks, each a few epochs long.

A task starts from the run's last checkpoint (or from scratch), trains, and
returns its per-epoch metrics and a new checkpoint.  Shuffling is seeded by
(seed, epoch), so a run resumed from any checkpoint gives the same weights as an
uninterrupted one (same seed, same device, same thread count).
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataError, Mnist, Split, load_mnist, normalise
from .model import MnistCNN, l1_penalty
from .tasks import L1_SCALE, LEGACY_L1_SCALE

EVAL_BATCH = 1000
PROGRESS_EVERY_S = 0.5


@dataclass
class RunSpec:
    """Everything an engine needs to train one run; sent from the master as a dict."""

    run_id: str = "run"
    data_dir: str = ""
    download: bool = False
    epochs: int = 1  # the run's total budget: the schedule spans all of it
    lr: float = 0.01
    l1: float = 0.0
    batch_size: int = 128
    optimizer: str = "adam"
    momentum: float = 0.9
    schedule: str = "onecycle"
    seed: int = 0
    device: str = "auto"
    conv1: int = 20
    conv2: int = 40
    hidden: int = 100
    subset: int = 0
    threads: int = 0  # torch intra-op threads; 0 = leave as the process has it
    # how l1 enters each batch's loss: "batches" = l1 * sum(|w|) / training batches per epoch (the paper's
    # code; one epoch adds l1 * sum(|w|) in all); "none" = l1 * sum(|w|) per batch (runs stored before this)
    l1_scale: str = L1_SCALE

    @classmethod
    def from_dict(cls, values: dict) -> "RunSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float
    val_accuracy: float
    test_accuracy: float
    seconds: float  # training and evaluation
    train_seconds: float  # training alone: what images/s is computed from
    images_per_s: float
    lr: float


@dataclass
class TaskResult:
    """What one task returns to the master."""

    run_id: str
    epochs: list[dict]
    checkpoint: bytes
    completed_epochs: int
    host: str
    pid: int
    device: str
    threads: int
    diverged: bool = False


ProgressFn = Callable[[dict], None]


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but this engine has no CUDA device; use device=auto or cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass
class Setup:
    """What differs between workloads (MNIST's CNN, CIFAR's VGG/ResNet): everything else is shared."""

    model: nn.Module  # built and seeded, on the device
    train: Split
    val: Split
    test: Split
    normalise: Callable[[torch.Tensor], torch.Tensor]  # uint8 batch -> float input, on the batch's device
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output, labels) -> scalar
    augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None
    eval_batch: int = EVAL_BATCH


@dataclass
class Shard:
    """This process's part of a data-parallel run (engines/distributed.py); rank 0 of 1 trains alone.

    Every rank walks the same seeded order of global batches and takes its contiguous slice of each,
    so the sequence of global batches, and hence the result, does not depend on the engine count.
    """

    rank: int = 0
    world: int = 1
    wrap: Callable[[nn.Module], nn.Module] = lambda model: model  # DistributedDataParallel for world > 1

    @property
    def leader(self) -> bool:
        """Rank 0 evaluates, checkpoints and reports progress."""
        return self.rank == 0

    def part(self, index: torch.Tensor) -> torch.Tensor:
        return index.tensor_split(self.world)[self.rank] if self.world > 1 else index

    def weight(self, part: int, batch: int) -> float:
        """DDP averages gradients over ranks: this rank's share makes the average the global batch's mean."""
        return part * self.world / batch


def build_optimizer(spec, model: nn.Module, steps_per_epoch: int):
    """Adam or SGD (momentum, Nesterov with ``spec.nesterov``), one-cycle or constant learning rate."""
    weight_decay = getattr(spec, "weight_decay", 0.0)
    if spec.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=weight_decay)
    elif spec.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                                    weight_decay=weight_decay,
                                    nesterov=getattr(spec, "nesterov", False) and spec.momentum > 0)
    else:
        raise ValueError(f"optimizer {spec.optimizer!r}: expected adam or sgd")
    total_steps = spec.epochs * steps_per_epoch
    if spec.schedule == "onecycle" and total_steps >= 3:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=spec.lr, total_steps=total_steps,
            # a short warm-up matters most when the whole budget is one epoch; at least 2 steps of it,
            # or OneCycleLR divides by zero on tiny data sets
            pct_start=max(0.25, 2 / total_steps), cycle_momentum=spec.optimizer == "sgd",
        )
    elif spec.schedule in ("constant", "onecycle"):  # fewer than 3 steps in all: no cycle to speak of
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    else:
        raise ValueError(f"schedule {spec.schedule!r}: expected onecycle or constant")
    return optimizer, scheduler


def save_checkpoint(epoch: int, model, optimizer, scheduler, spec) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {
            "epoch": epoch,
            "spec": spec.to_dict(),
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        buffer,
    )
    return buffer.getvalue()


def load_checkpoint(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


@torch.inference_mode()
def accuracy(model: nn.Module, split: Split, normalise: Callable = normalise, batch: int = EVAL_BATCH) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(split), batch):
        images = normalise(split.images[start:start + batch].to(device, non_blocking=True))
        labels = split.labels[start:start + batch].to(device, non_blocking=True)
        correct += (model(images).argmax(1) == labels).sum().item()
    return correct / max(1, len(split))


def run_task(spec, setup: Callable[[torch.device], Setup], checkpoint: Optional[bytes] = None,
             n_epochs: Optional[int] = None, progress: Optional[ProgressFn] = None,
             shard: Optional[Shard] = None, device: Optional[torch.device] = None) -> TaskResult:
    """The training task every workload shares: ``n_epochs`` (default: to the end of the budget) from
    ``checkpoint``; ``spec`` has run_id, epochs, lr, batch_size, optimizer, momentum, schedule, seed,
    device, subset and threads."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    shard = shard or Shard()
    device = device or pick_device(spec.device)
    torch.manual_seed(spec.seed)  # the model's initial weights
    work = setup(device)
    if spec.subset:
        work.train = Split(work.train.images[:spec.subset], work.train.labels[:spec.subset])
    if not len(work.train):
        raise DataError(f"{getattr(spec, 'data_dir', '')}: no training images for run {spec.run_id}")
    optimizer, scheduler = build_optimizer(spec, work.model, -(-len(work.train) // spec.batch_size))
    done = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        work.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        done = state["epoch"]
    net = shard.wrap(work.model)
    last = spec.epochs if n_epochs is None else min(spec.epochs, done + n_epochs)
    metrics: list[dict] = []
    diverged = False
    for epoch in range(done + 1, last + 1):
        m = _train_one_epoch(spec, work, net, optimizer, scheduler, epoch, device, progress, shard)
        metrics.append(dataclasses.asdict(m))
        done = epoch
        if not math.isfinite(m.train_loss):
            diverged = True  # NaN/inf: further epochs cannot recover
            break
    return TaskResult(
        run_id=spec.run_id,
        epochs=metrics,
        checkpoint=save_checkpoint(done, work.model, optimizer, scheduler, spec) if shard.leader else b"",
        completed_epochs=done,
        host=socket.gethostname(),
        pid=os.getpid(),
        device=_device_name(device),
        threads=torch.get_num_threads(),
        diverged=diverged,
    )


def _train_one_epoch(spec, work: Setup, net: nn.Module, optimizer, scheduler, epoch: int, device: torch.device,
                     progress: Optional[ProgressFn], shard: Shard) -> EpochMetrics:
    model, train = work.model, work.train
    model.train()
    generator = torch.Generator().manual_seed(spec.seed * 100_003 + epoch)
    order = torch.randperm(len(train), generator=generator).to(train.images.device)
    batches = -(-len(train) // spec.batch_size)
    total_loss = torch.zeros((), device=device)
    started = last_report = time.perf_counter()
    for step in range(batches):
        batch = order[step * spec.batch_size:(step + 1) * spec.batch_size]
        index = shard.part(batch)
        # a no-op where the data set already lives on the device (MNIST); per batch otherwise (CIFAR)
        images = train.images[index].to(device, non_blocking=True)
        labels = train.labels[index].to(device, non_blocking=True)
        if work.augment is not None:
            images = work.augment(images, generator)
        optimizer.zero_grad(set_to_none=True)
        output = net(work.normalise(images))
        if len(index):
            loss = work.loss(output, labels)
            scaled = loss * shard.weight(len(index), len(batch)) if shard.world > 1 else loss
        else:  # a last batch smaller than the world: this rank still joins the gradient all-reduce, with zeros
            loss = scaled = output.sum() * 0.0 + sum(p.sum() for p in model.parameters()) * 0.0
        scaled.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.detach()
        if shard.leader and progress is not None and time.perf_counter() - last_report >= PROGRESS_EVERY_S:
            last_report = time.perf_counter()
            progress({"run_id": spec.run_id, "epoch": epoch, "epochs": spec.epochs, "batch": step + 1,
                      "batches": batches, "loss": float(loss.detach())})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - started
    # the other ranks hold the same weights: only the leader spends time on evaluation
    val = accuracy(model, work.val, work.normalise, work.eval_batch) if shard.leader else math.nan
    test = accuracy(model, work.test, work.normalise, work.eval_batch) if shard.leader else math.nan
    metrics = EpochMetrics(
        epoch=epoch,
        train_loss=float(total_loss) / batches,
        val_accuracy=val,
        test_accuracy=test,
        seconds=time.perf_counter() - started,
        train_seconds=train_seconds,
        images_per_s=len(train) / train_seconds,
        lr=optimizer.param_groups[0]["lr"],
    )
    if shard.leader and progress is not None:
        progress({"run_id": spec.run_id, "epoch": epoch, "epochs": spec.epochs, "batch": batches,
                  "batches": batches, "done": dataclasses.asdict(metrics)})
    return metrics


# MNIST ---------------------------------------------------------------------------
def mnist_setup(spec: RunSpec, device: torch.device, data: Optional[Mnist] = None) -> Setup:
    data = _on_device(data if data is not None else load_mnist(Path(spec.data_dir), spec.download), device)
    model = MnistCNN(spec.conv1, spec.conv2, spec.hidden).to(device, memory_format=torch.channels_last)
    l1 = spec.l1 / l1_divisor(spec, len(data.train))

    def loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        value = F.nll_loss(output, labels)
        return value + l1 * l1_penalty(model) if l1 else value

    return Setup(model=model, train=data.train, val=data.val, test=data.test, normalise=normalise, loss=loss)


def l1_divisor(spec: RunSpec, n_train: int) -> int:
    """What the L1 term of each batch's loss is divided by: the training batches per epoch (global
    batches, also in a distributed run), or 1 for runs stored under the old per-batch convention."""
    if spec.l1_scale == LEGACY_L1_SCALE:
        return 1
    if spec.l1_scale != L1_SCALE:
        raise ValueError(f"l1_scale {spec.l1_scale!r}: expected {L1_SCALE} or {LEGACY_L1_SCALE}")
    n = min(spec.subset, n_train) if spec.subset else n_train
    return max(1, -(-n // spec.batch_size))


def train_epochs(
    spec: RunSpec | dict,
    checkpoint: Optional[bytes] = None,
    n_epochs: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
    data: Optional[Mnist] = None,
) -> TaskResult:
    """An MNIST run: ``n_epochs`` (default: to the end of the budget) from ``checkpoint``."""
    spec = RunSpec.from_dict(spec) if isinstance(spec, dict) else spec
    return run_task(spec, lambda device: mnist_setup(spec, device, data), checkpoint, n_epochs, progress)


_DEVICE_DATA: dict[tuple[int, str], Mnist] = {}


def _on_device(data: Mnist, device: torch.device) -> Mnist:
    """Keep one copy of the data per device (a GPU engine uploads the set once)."""
    if device.type == "cpu":
        return data
    key = (id(data), str(device))
    if key not in _DEVICE_DATA:
        _DEVICE_DATA[key] = data.to(device)
    return _DEVICE_DATA[key]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"

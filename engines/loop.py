"""The training loop every workload shares: a run is a chain of short tasks.

A task starts from the run's last checkpoint (or from scratch), trains to the end of
the epoch it is in, or for ``task_seconds``, or until the engine is asked to stop
(engines/process/stopping.py: a drain or a spot notice), whichever comes first, and returns
the metrics of the epochs it finished and a new checkpoint.  A checkpoint may stand
in the middle of an epoch: it carries the position (batches done), the epoch's loss
sum and seconds so far, the shuffling/augmentation generator and the global RNG, so a
run resumed from any checkpoint gives the same weights as an uninterrupted one (same
seed, same device, same thread count).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Optional, Self, Union

import torch
from torch import nn

from engines import held, optim
from engines.data import Split
from engines.process import stopping
from engines.spec import DRAIN, EVAL_BATCH, NOTICE, TIME, DataError, EpochMetrics, TaskResult

PROGRESS_EVERY_S = 0.5


@dataclass
class TrainingSpec:
    """What every workload's run spec has (the loop reads these); sent from the master as a dict, each
    workload's spec adds its own fields and defaults (engines/workloads/)."""

    run_id: str = "run"
    data_dir: str = ""
    epochs: int = 1  # the run's total budget: the schedule spans all of it
    lr: float = 0.01
    batch_size: int = 128
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False  # with SGD and momentum
    schedule: str = "onecycle"
    seed: int = 0
    device: str = "auto"
    subset: int = 0  # train on the first N training images only; 0 = all
    threads: int = 0  # torch intra-op threads; 0 = leave as the process has it
    task_seconds: float = 0.0  # a task ends after this long, at a batch boundary; 0 = at epoch ends only
    checkpoint_minutes: float = 0.0  # ship the checkpoint to the master this often; 0 = after every task

    @classmethod
    def from_dict(cls, values: dict) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    """This process's part of a data-parallel run (engines/ddp.py); rank 0 of 1 trains alone.

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
    weight_decay = spec.weight_decay
    optimizer: optim.Optimizer
    scheduler: optim.Schedule
    if spec.optimizer == "adam":
        optimizer = optim.Adam(model.parameters(), lr=spec.lr, weight_decay=weight_decay)
    elif spec.optimizer == "sgd":
        optimizer = optim.SGD(
            model.parameters(),
            lr=spec.lr,
            momentum=spec.momentum,
            weight_decay=weight_decay,
            nesterov=spec.nesterov and spec.momentum > 0,
        )
    else:
        raise ValueError(f"optimizer {spec.optimizer!r}: expected adam or sgd")
    total_steps = spec.epochs * steps_per_epoch
    if spec.schedule == "onecycle" and total_steps >= 3:
        scheduler = optim.OneCycle(
            optimizer,
            max_lr=spec.lr,
            total_steps=total_steps,
            # a short warm-up matters most when the whole budget is one epoch; at least 2 steps of it,
            # or the one-cycle schedule divides by zero on tiny data sets
            pct_start=max(0.25, 2 / total_steps),
            cycle_momentum=spec.optimizer == "sgd",
        )
    elif spec.schedule in ("constant", "onecycle"):  # fewer than 3 steps in all: no cycle to speak of
        scheduler = optim.Constant(optimizer)
    else:
        raise ValueError(f"schedule {spec.schedule!r}: expected onecycle or constant")
    return optimizer, scheduler


@dataclass
class Partial:
    """How far into an epoch a checkpoint stands: what exactness needs to go on from there."""

    batches_done: int
    loss_sum: torch.Tensor  # the epoch's summed batch losses so far (summed in the same order on resume)
    train_seconds: float  # the epoch's training seconds so far, over every task it took
    generator: torch.Tensor  # the epoch's shuffling/augmentation generator state after those batches

    def to_dict(self) -> dict:
        return {
            "batches_done": self.batches_done,
            "loss_sum": self.loss_sum.detach().cpu(),
            "train_seconds": self.train_seconds,
            "generator": self.generator,
        }


def save_checkpoint(
    epoch: int,
    model,
    optimizer,
    scheduler,
    spec,
    partial: Optional[Partial] = None,
    device: Optional[torch.device] = None,
) -> bytes:
    buffer = io.BytesIO()
    state = {
        "epoch": epoch,
        "spec": spec.to_dict(),
        "model": {k: v.cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "partial": partial.to_dict() if partial is not None else None,
        # the global generator draws dropout masks (VGG16): a resumed run draws what an uninterrupted one would
        "rng": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    torch.save(state, buffer)
    return buffer.getvalue()


def checkpoint_position(state: dict) -> tuple[int, int]:
    """(whole epochs done, batches of the next epoch done) of a loaded checkpoint."""
    partial = state.get("partial")
    return state["epoch"], partial["batches_done"] if partial else 0


def load_checkpoint(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


@torch.inference_mode()
def accuracy(
    model: nn.Module,
    split: Split,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    batch: int = EVAL_BATCH,
    on_batch: Optional[Callable[[int], None]] = None,
) -> float:
    """The share of ``split`` the model gets right; ``on_batch(images done)`` after each batch."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(split), batch):
        images = normalise(split.images[start : start + batch].to(device, non_blocking=True))
        labels = split.labels[start : start + batch].to(device, non_blocking=True)
        correct += (model(images).argmax(1) == labels).sum().item()
        if on_batch is not None:
            on_batch(start + len(labels))
    return correct / max(1, len(split))


def evaluation_heartbeat(progress: ProgressFn, update: dict, split: str) -> Callable[[int], None]:
    """Progress while evaluating, at most every PROGRESS_EVERY_S: the master's stall watch
    ([cluster] stall_minutes) hears an engine evaluating a big split (CIFAR on a CPU: minutes) as alive."""
    last = [time.perf_counter()]

    def beat(images: int) -> None:
        if time.perf_counter() - last[0] >= PROGRESS_EVERY_S:
            last[0] = time.perf_counter()
            progress({**update, "evaluating": split, "images": images})

    return beat


def run_task(
    spec,
    setup: Callable[[torch.device], Setup],
    checkpoint: Union[bytes, dict, None] = None,
    n_epochs: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
    shard: Optional[Shard] = None,
    device: Optional[torch.device] = None,
) -> TaskResult:
    """The training task every workload shares: from ``checkpoint`` (bytes, an engines.held reference, or
    None) to the end of ``n_epochs`` epochs (default: to the end of the budget), ending early after
    ``spec.task_seconds`` or on a stop request; ``spec`` has run_id, epochs, lr, batch_size, optimizer,
    momentum, schedule, seed, device, subset, threads, task_seconds and checkpoint_minutes.

    A distributed task (``shard`` given) keeps whole epochs: its ranks could not agree on where to stop."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    alone = shard is None
    shard = shard or Shard()
    device = device or pick_device(spec.device)
    checkpoint = held.resolve(spec.run_id, checkpoint) if alone else checkpoint
    assert not isinstance(checkpoint, dict), "only a run's own engine resolves a held reference"
    going = stopping.requested() if alone else None
    if going in (DRAIN, NOTICE):
        # the engine is going away: hand the checkpoint back at once for another engine to go on from
        return _unchanged(spec, checkpoint, going, device)
    torch.manual_seed(spec.seed)  # the model's initial weights
    work = setup(device)
    if spec.subset:
        work.train = Split(work.train.images[: spec.subset], work.train.labels[: spec.subset])
    if not len(work.train):
        raise DataError(f"{spec.data_dir}: no training images for run {spec.run_id}")
    batches = -(-len(work.train) // spec.batch_size)
    optimizer, scheduler = build_optimizer(spec, work.model, batches)
    done, partial = 0, None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        work.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        done = state["epoch"]
        if state.get("partial"):
            partial = Partial(**state["partial"])
        if state.get("rng") is not None:
            torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    net = shard.wrap(work.model)
    last = spec.epochs if n_epochs is None else min(spec.epochs, done + n_epochs)
    task_seconds = spec.task_seconds if alone else 0.0
    clock = _TaskClock(time.perf_counter() + task_seconds if task_seconds > 0 else math.inf, alone)
    metrics: list[dict] = []
    diverged = False
    for epoch in range(done + 1, last + 1):
        m = _train_one_epoch(spec, work, net, optimizer, scheduler, epoch, device, progress, shard, partial, clock)
        if isinstance(m, Partial):
            partial = m
            break
        partial = None
        metrics.append(dataclasses.asdict(m))
        done = epoch
        if not math.isfinite(m.train_loss):
            diverged = True  # NaN/inf: further epochs cannot recover
            break
        if clock.stopped is not None:  # the stop came at the epoch's last batch: the epoch is whole
            break
    position = partial.batches_done if partial is not None else 0
    data = save_checkpoint(done, work.model, optimizer, scheduler, spec, partial, device) if shard.leader else b""
    result = TaskResult(
        run_id=spec.run_id,
        epochs=metrics,
        checkpoint=data,
        completed_epochs=done,
        host=socket.gethostname(),
        pid=os.getpid(),
        device=_device_name(device),
        threads=torch.get_num_threads(),
        diverged=diverged,
        batches_done=position,
        epoch_batches=batches,
        batches_run=clock.batches,
        stopped=clock.stopped,
    )
    if alone:
        _settle(spec, result)
    return result


@dataclass
class _TaskClock:
    """When the running task must end early: at ``deadline`` (task_seconds) or on an engine stop request."""

    deadline: float
    interruptible: bool
    batches: int = 0  # trained by this task so far
    stopped: Optional[str] = None

    def after_batch(self) -> bool:
        """Called after every batch; True when the task ends here (always after at least one batch)."""
        self.batches += 1
        if not self.interruptible:
            return False
        reason = stopping.requested()
        if reason in (DRAIN, NOTICE):
            self.stopped = reason
        elif time.perf_counter() >= self.deadline:
            self.stopped = TIME
        return self.stopped is not None


def _settle(spec, result: TaskResult) -> None:
    """Ship the new checkpoint to the master or keep it here (engines/held.py, ``checkpoint_minutes``)."""
    ends = result.completed_epochs >= spec.epochs or result.diverged
    must_ship = ends or result.stopped in (DRAIN, NOTICE)
    ship, keep = held.keep_or_ship(
        spec.run_id,
        result.checkpoint or b"",
        result.completed_epochs,
        result.batches_done,
        spec.checkpoint_minutes,
        must_ship,
    )
    if not ship:
        result.checkpoint = None
    result.held = keep


def _unchanged(spec, checkpoint: Optional[bytes], stopped: str, device: torch.device) -> TaskResult:
    """A task that trains nothing: the checkpoint it was given goes back (shipped: the engine is going)."""
    done, position = checkpoint_position(load_checkpoint(checkpoint)) if checkpoint is not None else (0, 0)
    held.forget(spec.run_id)
    return TaskResult(
        run_id=spec.run_id,
        epochs=[],
        checkpoint=checkpoint,
        completed_epochs=done,
        host=socket.gethostname(),
        pid=os.getpid(),
        device=_device_name(device),
        threads=torch.get_num_threads(),
        batches_done=position,
        stopped=stopped,
    )


def _train_one_epoch(
    spec,
    work: Setup,
    net: nn.Module,
    optimizer,
    scheduler,
    epoch: int,
    device: torch.device,
    progress: Optional[ProgressFn],
    shard: Shard,
    partial: Optional[Partial] = None,
    clock: Optional[_TaskClock] = None,
) -> "EpochMetrics | Partial":
    """The epoch, from ``partial`` (a checkpoint's position in it) when given; a :class:`Partial` when the
    clock ends the task before the epoch's last batch."""
    model, train = work.model, work.train
    clock = clock or _TaskClock(math.inf, False)
    model.train()
    generator = torch.Generator().manual_seed(spec.seed * 100_003 + epoch)
    order = torch.randperm(len(train), generator=generator).to(train.images.device)
    batches = -(-len(train) // spec.batch_size)
    total_loss = torch.zeros((), device=device)
    first, seconds_before = 0, 0.0
    if partial is not None:
        first, seconds_before = partial.batches_done, partial.train_seconds
        total_loss = partial.loss_sum.to(device)
        generator.set_state(partial.generator)
    started = last_report = time.perf_counter()
    for step in range(first, batches):
        batch = order[step * spec.batch_size : (step + 1) * spec.batch_size]
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
            progress(
                {
                    "run_id": spec.run_id,
                    "epoch": epoch,
                    "epochs": spec.epochs,
                    "batch": step + 1,
                    "batches": batches,
                    "loss": float(loss.detach()),
                }
            )
        if clock.after_batch() and step + 1 < batches:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return Partial(
                batches_done=step + 1,
                loss_sum=total_loss,
                train_seconds=seconds_before + time.perf_counter() - started,
                generator=generator.get_state(),
            )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = seconds_before + time.perf_counter() - started
    # the other ranks hold the same weights: only the leader spends time on evaluation
    evaluated = time.perf_counter()
    reported = {"run_id": spec.run_id, "epoch": epoch, "epochs": spec.epochs, "batch": batches, "batches": batches}
    val = test = math.nan
    if shard.leader:
        beat = (lambda split: evaluation_heartbeat(progress, reported, split)) if progress else lambda split: None
        val = accuracy(model, work.val, work.normalise, work.eval_batch, beat("val"))
        test = accuracy(model, work.test, work.normalise, work.eval_batch, beat("test"))
    metrics = EpochMetrics(
        epoch=epoch,
        train_loss=float(total_loss) / batches,
        val_accuracy=val,
        test_accuracy=test,
        seconds=train_seconds + time.perf_counter() - evaluated,
        train_seconds=train_seconds,
        images_per_s=len(train) / train_seconds,
        lr=optimizer.param_groups[0]["lr"],
    )
    if shard.leader and progress is not None:
        progress({**reported, "done": dataclasses.asdict(metrics)})
    return metrics


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"

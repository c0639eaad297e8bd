"""CIFAR-10 on an engine: the standard python batches, torchvision's VGG16 and ResNet18.

The data is the "CIFAR-10 python version" layout that torchvision also reads:
``DATA_DIR/cifar-10-batches-py/data_batch_1..5`` and ``test_batch``, each a
pickle of ``{b"data": uint8 N x 3072, b"labels": [N ints]}``.  Nothing is ever
downloaded here: a missing or malformed file is a :class:`DataError` naming it.

The models are torchvision's with ``weights=None`` and 10 classes, adapted to
32x32 inputs the usual way (a 1x1 pooled head for VGG16 instead of the 7x7
ImageNet head of 100M parameters; a 3x3 stride-1 stem and no max-pool for
ResNet18, which would otherwise shrink 32x32 to 1x1 before its last stage).

``engines.tasks.cifar_task`` wraps :func:`train_cifar` with the same
(spec, checkpoint, n_epochs) -> TaskResult-dict contract as ``train_task``, so
the scheduler runs it unchanged (and the master names it without importing torch).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import DataError, Split
from .train import EpochMetrics, TaskResult, load_checkpoint, pick_device

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
MODELS = ("vgg16", "resnet18")
EVAL_BATCH = 500
PROGRESS_EVERY_S = 0.5
VAL_FRACTION = 0.1  # the last 10% of the training batches validate (5,000 of 50,000)


@dataclass
class CifarSpec:
    """A CIFAR run; field names match engines.train.RunSpec where they mean the same."""

    run_id: str = "run"
    data_dir: str = ""
    model: str = "resnet18"
    epochs: int = 5
    lr: float = 0.05
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    seed: int = 0
    device: str = "auto"
    subset: int = 0  # train on the first N training images only; 0 = all
    augment: bool = True  # random crop (pad 4) and horizontal flip
    threads: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "CifarSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Cifar:
    train: Split  # images uint8 N x 3 x 32 x 32
    val: Split
    test: Split


# data ---------------------------------------------------------------------------
def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python batch -> (uint8 N x 3 x 32 x 32, int64 N); every problem names the file."""
    if not path.exists():
        raise DataError(
            f"{path}: missing; expected the CIFAR-10 python batches (cifar-10-python.tar.gz unpacked) "
            f"under {path.parent} -- nothing is downloaded, copy them there")
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
    except Exception as error:  # a truncated or foreign file: say which one
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (a {type(batch).__name__}, expected a dict)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: no 'data' and 'labels' keys (found {sorted(map(repr, batch))})")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: data is {data.dtype} {data.shape}, expected uint8 N x 3072 (3 x 32 x 32)")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels


_CACHE: dict[str, Cifar] = {}


def load_cifar10(data_dir: Path) -> Cifar:
    """Read (once per process) and split CIFAR-10: 45,000 train, 5,000 validation, 10,000 test."""
    folder = Path(data_dir).expanduser() / FOLDER
    key = str(folder.resolve())
    if key not in _CACHE:
        if not folder.is_dir():
            raise DataError(
                f"{folder}: no CIFAR-10 here; put the python batches (data_batch_1..5, test_batch) in "
                f"that folder -- they are never downloaded at run time")
        parts = [read_batch(folder / name) for name in TRAIN_FILES]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        test_images, test_labels = read_batch(folder / TEST_FILE)
        cut = len(labels) - max(1, int(len(labels) * VAL_FRACTION))
        _CACHE[key] = Cifar(
            train=Split(images[:cut], labels[:cut]),
            val=Split(images[cut:], labels[cut:]),
            test=Split(torch.from_numpy(test_images), torch.from_numpy(test_labels)))
    return _CACHE[key]


def write_cifar10_batches(data_dir: Path, per_batch: int = 16, n_test: int = 32, seed: int = 0) -> Path:
    """Small learnable CIFAR-10 python batches in the standard format (tests); returns data_dir."""
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, size=(10, 3, 4, 4)).astype(np.float32)
    prototypes = np.kron(prototypes, np.ones((1, 8, 8), dtype=np.float32))  # 10 x 3 x 32 x 32

    def make(n: int) -> dict:
        labels = rng.integers(0, 10, size=n)
        images = np.clip(prototypes[labels] + rng.normal(0, 25, size=(n, 3, 32, 32)), 0, 255)
        return {b"batch_label": b"synthetic", b"labels": [int(x) for x in labels],
                b"data": images.astype(np.uint8).reshape(n, 3072), b"filenames": [b""] * n}

    folder = Path(data_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_FILES:
        with open(folder / name, "wb") as handle:
            pickle.dump(make(per_batch), handle)
    with open(folder / TEST_FILE, "wb") as handle:
        pickle.dump(make(n_test), handle)
    return Path(data_dir)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x 32 x 32 -> float, per-channel zero mean and unit variance, channels-last."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    batch = (images.float() / 255.0 - mean) / std
    return batch.contiguous(memory_format=torch.channels_last)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4 pixels of zero padding and random horizontal flips, per image."""
    n = len(images)
    padded = F.pad(images, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=generator).to(images.device)
    dy = torch.randint(0, 9, (n,), generator=generator).to(images.device)
    # gather a 32x32 window per image with index arithmetic: no Python loop over images
    rows = (dy.view(n, 1) + torch.arange(32, device=images.device).view(1, 32))  # n x 32
    cols = (dx.view(n, 1) + torch.arange(32, device=images.device).view(1, 32))
    flip = torch.rand(n, generator=generator).to(images.device) < 0.5
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    index_n = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    index_c = torch.arange(3, device=images.device).view(1, 3, 1, 1)
    return padded[index_n, index_c, rows.view(n, 1, 32, 1), cols.view(n, 1, 1, 32)]


# models -------------------------------------------------------------------------
def build_model(name: str) -> nn.Module:
    """torchvision's VGG16 / ResNet18, untrained, 10 classes, adapted to 32x32 inputs."""
    import torchvision.models as models

    if name == "vgg16":
        model = models.vgg16(weights=None, num_classes=10)
        # 32x32 leaves 512 x 1 x 1 after the five pools; the ImageNet head would upsample it to 7x7
        model.avgpool = nn.Flatten()
        model.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(512, 10))
        return model
    if name == "resnet18":
        model = models.resnet18(weights=None, num_classes=10)
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    raise ValueError(f"model {name!r}: expected one of {', '.join(MODELS)}")


def _build(spec: CifarSpec, steps_per_epoch: int, device: torch.device):
    torch.manual_seed(spec.seed)
    model = build_model(spec.model).to(device, memory_format=torch.channels_last)
    if spec.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                                    weight_decay=spec.weight_decay, nesterov=spec.momentum > 0)
    elif spec.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    else:
        raise ValueError(f"optimizer {spec.optimizer!r}: expected sgd or adam")
    total = spec.epochs * steps_per_epoch
    if spec.schedule == "onecycle" and total >= 3:
        # a warm-up of at least 2 steps: OneCycleLR divides by zero on shorter phases (tiny data sets)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=spec.lr, total_steps=total, pct_start=max(0.25, 2 / total),
            cycle_momentum=spec.optimizer == "sgd")
    elif spec.schedule in ("onecycle", "constant"):  # fewer than 3 steps in all: no cycle to speak of
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    else:
        raise ValueError(f"schedule {spec.schedule!r}: expected onecycle or constant")
    return model, optimizer, scheduler


@torch.inference_mode()
def accuracy(model: nn.Module, split: Split) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(split), EVAL_BATCH):
        images = normalise(split.images[start:start + EVAL_BATCH])
        correct += (model(images).argmax(1) == split.labels[start:start + EVAL_BATCH]).sum().item()
    return correct / max(1, len(split))


# the task -----------------------------------------------------------------------
def train_cifar(spec: CifarSpec | dict, checkpoint: Optional[bytes] = None, n_epochs: Optional[int] = None,
                progress: Optional[Callable[[dict], None]] = None, data: Optional[Cifar] = None) -> TaskResult:
    """Train ``n_epochs`` (default: to the end of the budget) from ``checkpoint``."""
    import io

    spec = CifarSpec.from_dict(spec) if isinstance(spec, dict) else spec
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = pick_device(spec.device)
    data = data if data is not None else load_cifar10(Path(spec.data_dir))
    train = data.train if not spec.subset else Split(data.train.images[:spec.subset], data.train.labels[:spec.subset])
    if not len(train):
        raise DataError(f"{spec.data_dir}: no CIFAR-10 training images")
    steps = -(-len(train) // spec.batch_size)
    model, optimizer, scheduler = _build(spec, steps, device)
    done = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        done = state["epoch"]
    last = spec.epochs if n_epochs is None else min(spec.epochs, done + n_epochs)
    metrics: list[dict] = []
    diverged = False
    for epoch in range(done + 1, last + 1):
        m = _epoch(spec, model, optimizer, scheduler, train, data, epoch, device, progress)
        metrics.append(dataclasses.asdict(m))
        done = epoch
        if not np.isfinite(m.train_loss):
            diverged = True
            break
    buffer = io.BytesIO()
    torch.save({"epoch": done, "spec": spec.to_dict(),
                "model": {k: v.cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    return TaskResult(
        run_id=spec.run_id, epochs=metrics, checkpoint=buffer.getvalue(), completed_epochs=done,
        host=socket.gethostname(), pid=os.getpid(),
        device=f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(), diverged=diverged)


def _epoch(spec: CifarSpec, model, optimizer, scheduler, train: Split, data: Cifar, epoch: int,
           device: torch.device, progress) -> EpochMetrics:
    model.train()
    # seeded by (seed, epoch) like the MNIST runs: a resumed run sees the same batches
    generator = torch.Generator().manual_seed(spec.seed * 100_003 + epoch)
    order = torch.randperm(len(train), generator=generator)
    batches = -(-len(train) // spec.batch_size)
    total_loss = torch.zeros((), device=device)
    started = last_report = time.perf_counter()
    for step in range(batches):
        index = order[step * spec.batch_size:(step + 1) * spec.batch_size]
        images, labels = train.images[index].to(device), train.labels[index].to(device)
        if spec.augment:
            images = augment(images, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(normalise(images)), labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.detach()
        if progress is not None and time.perf_counter() - last_report >= PROGRESS_EVERY_S:
            last_report = time.perf_counter()
            progress({"run_id": spec.run_id, "epoch": epoch, "epochs": spec.epochs, "batch": step + 1,
                      "batches": batches, "loss": float(loss.detach())})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - started
    val, test = accuracy(model, _on(data.val, device)), accuracy(model, _on(data.test, device))
    metrics = EpochMetrics(
        epoch=epoch, train_loss=float(total_loss) / batches, val_accuracy=val, test_accuracy=test,
        seconds=time.perf_counter() - started, train_seconds=train_seconds,
        images_per_s=len(train) / train_seconds, lr=optimizer.param_groups[0]["lr"])
    if progress is not None:
        progress({"run_id": spec.run_id, "epoch": epoch, "epochs": spec.epochs, "batch": batches,
                  "batches": batches, "done": dataclasses.asdict(metrics)})
    return metrics


def _on(split: Split, device: torch.device) -> Split:
    return split if device.type == "cpu" else split.to(device)

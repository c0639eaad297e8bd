"""The paper's workload: its CNN on MNIST, with L1 weight regularisation, over the shared training loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from engines.data import Mnist, load_mnist, normalise
from engines.loop import ProgressFn, Setup, TrainingSpec, run_task
from engines.spec import EVAL_BATCH, L1_SCALE, LEGACY_L1_SCALE, TaskResult
from engines.workloads.cnn import MnistCNN, l1_penalty

# the MNIST CNN evaluates 30 % faster on a CPU in batches of 250 than of 1000 (a 1000-image batch's
# activations overflow the caches; benchmarks/eval_batch.py); a GPU wants big batches. A divisor of
# EVAL_BATCH: inference shards cut at its multiples (controller/work/inference.py) then hold whole batches
MNIST_CPU_EVAL_BATCH = 250


@dataclass
class RunSpec(TrainingSpec):
    """A run of the paper's CNN: the loop's fields and the model's; sent from the master as a dict."""

    download: bool = False
    l1: float = 0.0
    conv1: int = 20
    conv2: int = 40
    hidden: int = 100
    # how l1 enters each batch's loss: "batches" = l1 * sum(|w|) / training batches per epoch (the paper's
    # code; one epoch adds l1 * sum(|w|) in all); "none" = l1 * sum(|w|) per batch (runs stored before this)
    l1_scale: str = L1_SCALE


def mnist_setup(spec: RunSpec, device: torch.device, data: Optional[Mnist] = None) -> Setup:
    data = _on_device(data if data is not None else load_mnist(Path(spec.data_dir), spec.download), device)
    model = MnistCNN(spec.conv1, spec.conv2, spec.hidden).to(device).to(memory_format=torch.channels_last)
    l1 = spec.l1 / l1_divisor(spec, len(data.train))

    def loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        value = F.nll_loss(output, labels)
        return value + l1 * l1_penalty(model) if l1 else value

    return Setup(
        model=model,
        train=data.train,
        val=data.val,
        test=data.test,
        normalise=normalise,
        loss=loss,
        eval_batch=mnist_eval_batch(device),
    )


def mnist_eval_batch(device: torch.device) -> int:
    return MNIST_CPU_EVAL_BATCH if device.type == "cpu" else EVAL_BATCH


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
    checkpoint: Union[bytes, dict, None] = None,
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

"""A trained model applied to a data set on an engine: loaded once, kept, then fed contiguous shards.

The master sends the checkpoint once per engine (``load_model``, keyed by the checkpoint's
sha256); every later shard names the key only.  ``predict`` is the single-process loop the
shards run, so split inference and one loop over the whole split give the same numbers
when the shards start at multiples of the batch (the master cuts them so).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from engines.data import Split, load_mnist
from engines.data import normalise as mnist_normalise
from engines.loop import load_checkpoint, pick_device
from engines.spec import EVAL_BATCH
from engines.workloads.mnist import mnist_eval_batch

SPLITS = ("test", "val", "train")
PROGRESS_EVERY_S = 0.5
KEEP_MODELS = 4  # models an engine keeps for later calls


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, on ``device``
    normalise: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    kind: str  # mnist or cifar
    spec: dict  # the spec stored in the checkpoint

    @property
    def batch(self) -> int:
        """Images a batch: what the model evaluates fastest on its device (CIFAR's models: any size on a CPU)."""
        return mnist_eval_batch(self.device) if self.kind == "mnist" else EVAL_BATCH


_MODELS: dict[str, LoadedModel] = {}  # this engine's loaded models, by checkpoint key


def checkpoint_key(checkpoint: bytes) -> str:
    return hashlib.sha256(checkpoint).hexdigest()[:20]


def build(checkpoint: bytes, device: str = "auto") -> LoadedModel:
    """The checkpoint's model (MNIST CNN, or the CIFAR model its spec names), weights loaded, eval mode."""
    state = load_checkpoint(checkpoint)
    spec = dict(state.get("spec") or {})
    target = pick_device(device)
    if spec.get("model"):
        from engines.workloads.cifar import build_model
        from engines.workloads.cifar import normalise as cifar_normalise

        model, norm, kind = build_model(spec["model"]), cifar_normalise, "cifar"
    else:
        from engines.workloads.cnn import MnistCNN

        model = MnistCNN(spec.get("conv1", 20), spec.get("conv2", 40), spec.get("hidden", 100))
        norm, kind = mnist_normalise, "mnist"
    model.load_state_dict(state["model"])
    model = model.to(target).to(memory_format=torch.channels_last).eval()
    return LoadedModel(model=model, normalise=norm, device=target, kind=kind, spec=spec)


def load_model(key: str, checkpoint: Optional[bytes], device: str = "auto", threads: int = 0) -> dict:
    """Keep the checkpoint's model on this engine under ``key``; with ``checkpoint=None`` only say whether
    it is already here.  Returns ``{"loaded", "kind", "spec"}``."""
    if threads:
        torch.set_num_threads(threads)
    if key not in _MODELS and checkpoint is not None:
        while len(_MODELS) >= KEEP_MODELS:  # the oldest goes: a long-lived engine must not fill its memory
            _MODELS.pop(next(iter(_MODELS)))
        _MODELS[key] = build(checkpoint, device)
    loaded = _MODELS.get(key)
    return {"loaded": loaded is not None, "kind": loaded.kind if loaded else "", "spec": loaded.spec if loaded else {}}


def split_of(kind: str, data_dir: str, split: str) -> Split:
    """The named split of the workload's data set (cached per engine by the loaders)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if kind == "cifar":
        from engines.workloads.cifar import load_cifar10

        return getattr(load_cifar10(Path(data_dir)), split)
    return getattr(load_mnist(Path(data_dir)), split)


@torch.inference_mode()
def predict(
    loaded: LoadedModel,
    images: torch.Tensor,
    batch: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class per image, int64; class probabilities, float32 N x classes) in batches of ``batch``
    (default: the model's own, ``LoadedModel.batch``)."""
    batch = batch or loaded.batch
    predictions, probabilities = [], []
    last = time.perf_counter()
    for start in range(0, len(images), batch):
        chunk = loaded.normalise(images[start : start + batch].to(loaded.device, non_blocking=True))
        probs = torch.softmax(loaded.model(chunk).float(), dim=1)
        predictions.append(probs.argmax(1).cpu())
        probabilities.append(probs.cpu())
        if progress is not None and time.perf_counter() - last >= PROGRESS_EVERY_S:
            last = time.perf_counter()
            progress(min(len(images), start + batch))
    if not predictions:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 10), dtype=np.float32)
    return torch.cat(predictions).numpy(), torch.cat(probabilities).numpy()


def predict_shard(
    key: str,
    kind: str,
    data_dir: str,
    split: str,
    start: int,
    stop: int,
    progress: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Images ``start:stop`` of the split through this engine's model ``key``."""
    loaded = _MODELS.get(key)
    if loaded is None:
        raise LookupError(f"model {key} is not loaded on this engine; the master loads it first")
    data = split_of(kind, data_dir, split)
    started = time.perf_counter()

    def report(done: int) -> None:
        if progress is not None:
            progress({"start": start, "done": done, "size": stop - start})

    predictions, probabilities = predict(loaded, data.images[start:stop], progress=report)
    return {
        "start": start,
        "stop": stop,
        "predictions": predictions,
        "probabilities": probabilities,
        "labels": data.labels[start:stop].numpy(),
        "seconds": time.perf_counter() - started,
    }

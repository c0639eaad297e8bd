"""CIFAR-10 on an engine: the standard python batches, torchvision's VGG16 and ResNet18.

The data is the "CIFAR-10 python version" layout that torchvision also reads:
``DATA_DIR/cifar-10-batches-py/data_batch_1..5`` and ``test_batch``, each a
pickle of ``{b"data": uint8 N x 3072, b"labels": [N ints]}``.  Nothing is ever
downloaded here: a missing or malformed file is a :class:`DataError` naming it.
A pickle can name any function to call while loading; these are read by
:class:`BatchUnpickler`, which lets through only what rebuilds numpy arrays, so
a planted file is refused instead of running code on the engine.

The models are torchvision's with ``weights=None`` and 10 classes, adapted to
32x32 inputs the usual way (a 1x1 pooled head for VGG16 instead of the 7x7
ImageNet head of 100M parameters; a 3x3 stride-1 stem and no max-pool for
ResNet18, which would otherwise shrink 32x32 to 1x1 before its last stage).

``engines.tasks.cifar_task`` wraps :func:`train_cifar` with the same
(spec, checkpoint, n_epochs) -> TaskResult-dict contract as ``train_task``, so
the scheduler runs it unchanged (and the master names it without importing torch).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engines.data import Split
from engines.loop import Setup, TrainingSpec, run_task
from engines.spec import CIFAR_FOLDER, CIFAR_TEST_FILE, CIFAR_TRAIN_FILES, DataError, TaskResult

FOLDER, TRAIN_FILES, TEST_FILE = CIFAR_FOLDER, CIFAR_TRAIN_FILES, CIFAR_TEST_FILE
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
MODELS = ("vgg16", "resnet18")
EVAL_BATCH = 500
VAL_FRACTION = 0.1  # the last 10% of the training batches validate (5,000 of 50,000)


@dataclass
class CifarSpec(TrainingSpec):
    """A CIFAR run: the loop's fields with CIFAR's defaults, and the model's own."""

    model: str = "resnet18"
    epochs: int = 5
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    nesterov: bool = True
    augment: bool = True  # random crop (pad 4) and horizontal flip


@dataclass
class Cifar:
    train: Split  # images uint8 N x 3 x 32 x 32
    val: Split
    test: Split


# data ---------------------------------------------------------------------------
# everything a CIFAR-10 python batch needs to be rebuilt: numpy arrays (pickled by numpy 1 or 2, any
# protocol) and Python 2 byte strings; nothing here can run a command or open a file
BATCH_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
        ("builtins", "bytes"),
    }
)


class BatchUnpickler(pickle.Unpickler):
    """Loads only numpy arrays, lists, dicts, numbers and strings; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in BATCH_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays, lists and strings"
            )
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python batch -> (uint8 N x 3 x 32 x 32, int64 N); every problem names the file."""
    if not path.exists():
        raise DataError(
            f"{path}: missing; expected the CIFAR-10 python batches (cifar-10-python.tar.gz unpacked) "
            f"under {path.parent} -- nothing is downloaded, copy them there"
        )
    try:
        with open(path, "rb") as handle:
            batch = BatchUnpickler(handle, encoding="bytes").load()
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file, whatever unpickling raised: say which one
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
                f"that folder -- they are never downloaded at run time"
            )
        parts = [read_batch(folder / name) for name in TRAIN_FILES]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        test_images, test_labels = read_batch(folder / TEST_FILE)
        cut = len(labels) - max(1, int(len(labels) * VAL_FRACTION))
        _CACHE[key] = Cifar(
            train=Split(images[:cut], labels[:cut]),
            val=Split(images[cut:], labels[cut:]),
            test=Split(torch.from_numpy(test_images), torch.from_numpy(test_labels)),
        )
    return _CACHE[key]


def write_cifar10_batches(data_dir: Path, per_batch: int = 16, n_test: int = 32, seed: int = 0) -> Path:
    """Small learnable CIFAR-10 python batches in the standard format (tests); returns data_dir."""
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, size=(10, 3, 4, 4)).astype(np.float32)
    prototypes = np.kron(prototypes, np.ones((1, 8, 8), dtype=np.float32))  # 10 x 3 x 32 x 32

    def make(n: int) -> dict:
        labels = rng.integers(0, 10, size=n)
        images = np.clip(prototypes[labels] + rng.normal(0, 25, size=(n, 3, 32, 32)), 0, 255)
        return {
            b"batch_label": b"synthetic",
            b"labels": [int(x) for x in labels],
            b"data": images.astype(np.uint8).reshape(n, 3072),
            b"filenames": [b""] * n,
        }

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
    rows = dy.view(n, 1) + torch.arange(32, device=images.device).view(1, 32)  # n x 32
    cols = dx.view(n, 1) + torch.arange(32, device=images.device).view(1, 32)
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
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(512, 10)
        )
        return model
    if name == "resnet18":
        model = models.resnet18(weights=None, num_classes=10)
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    raise ValueError(f"model {name!r}: expected one of {', '.join(MODELS)}")


# the task -----------------------------------------------------------------------
def cifar_setup(spec: CifarSpec, device: torch.device, data: Optional[Cifar] = None) -> Setup:
    """CIFAR's part of a training task; the loop, optimizer, schedule and checkpoints are engines.loop's."""
    data = data if data is not None else load_cifar10(Path(spec.data_dir))
    model = build_model(spec.model).to(device).to(memory_format=torch.channels_last)
    return Setup(
        model=model,
        train=data.train,
        val=data.val,
        test=data.test,
        normalise=normalise,
        loss=F.cross_entropy,
        augment=augment if spec.augment else None,
        eval_batch=EVAL_BATCH,
    )


def train_cifar(
    spec: CifarSpec | dict,
    checkpoint: Union[bytes, dict, None] = None,
    n_epochs: Optional[int] = None,
    progress: Optional[Callable[[dict], None]] = None,
    data: Optional[Cifar] = None,
) -> TaskResult:
    """Train ``n_epochs`` (default: to the end of the budget) from ``checkpoint`` (engines.loop.run_task)."""
    spec = CifarSpec.from_dict(spec) if isinstance(spec, dict) else spec
    return run_task(spec, lambda device: cifar_setup(spec, device, data), checkpoint, n_epochs, progress)

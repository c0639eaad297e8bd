"""MNIST from torchvision's on-disk layout, held in memory as uint8 tensors.

Split as the paper does: the first 50,000 training images train, the last
10,000 validate, and the 10,000 test images test.  An engine loads the files
once and keeps them (``load_mnist`` caches per directory); batches are
normalised on the fly, which is ~10x faster than per-item PIL transforms.
"""

from __future__ import annotations

import fcntl
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engines.spec import MNIST_FILES, DataError, mnist_raw_dir

log = logging.getLogger(__name__)

MEAN, STD = 0.1307, 0.3081
TRAIN_SIZE = 50_000
FILES = MNIST_FILES
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x 28 x 28
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Mnist:
    train: Split
    val: Split
    test: Split

    def to(self, device: torch.device) -> "Mnist":
        return Mnist(self.train.to(device), self.val.to(device), self.test.to(device))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 28 x 28 -> float N x 1 x 28 x 28, zero mean and unit variance over MNIST.

    Channels-last, like the model: oneDNN's convolutions are ~1.7x faster that way on a CPU.
    """
    batch = ((images.float() / 255.0) - MEAN).div_(STD).unsqueeze(1)
    return batch.contiguous(memory_format=torch.channels_last)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an uncompressed IDX file of unsigned bytes, checking magic and length."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, the header alone is {header})")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise DataError(
            f"{path}: wrong magic number 0x{found:08x}, expected 0x{magic:08x}; is this the right MNIST file?"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path}: truncated or padded IDX file: {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


raw_dir = mnist_raw_dir


def ensure_mnist(data_dir: Path, download: bool) -> Path:
    """Return the raw directory, downloading through torchvision if allowed and needed."""
    folder = raw_dir(data_dir)
    missing = [name for name in FILES.values() if not (folder / name).exists()]
    if not missing:
        return folder
    if download:
        log.info("MNIST missing from %s; downloading with torchvision", folder)
        root = Path(data_dir).expanduser()
        try:
            from torchvision.datasets import MNIST

            root.mkdir(parents=True, exist_ok=True)
            # engines on one host start together: one downloads, the others wait and then find the files
            with open(root / ".download.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                MNIST(root=str(root), train=True, download=True)
                MNIST(root=str(root), train=False, download=True)
        except Exception as exc:  # noqa: BLE001 - no network, a mirror down, a full disk: one message names them all
            raise DataError(
                f"MNIST is not in {folder} and the download failed ({exc}). "
                f"Put {', '.join(FILES.values())} there (torchvision's layout: DATA_DIR/MNIST/raw), "
                f"or set data_dir / $CLUSTER_DATA_DIR to a folder that has them."
            ) from None
        return raw_dir(data_dir)
    raise DataError(
        f"MNIST is not in {folder}: missing {', '.join(missing)}. Put the uncompressed IDX files there "
        f"(torchvision's layout: DATA_DIR/MNIST/raw), set data_dir / $CLUSTER_DATA_DIR to a folder that "
        f"has them, or set download = true in [cluster] on a machine with internet."
    )


_CACHE: dict[tuple[str, bool], Mnist] = {}


def check_contents(folder: Path, kind: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Shapes and labels the model can take: a label of 10 would otherwise surface as a CUDA device
    assert that leaves the engine's GPU context unusable, a 32x32 image as a shape error deep in the model."""
    images_file, labels_file = folder / FILES[kind + "_images"], folder / FILES[kind + "_labels"]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{images_file}: images are {' x '.join(map(str, images.shape[1:]))}, expected 28 x 28")
    if labels.ndim != 1:
        raise DataError(f"{labels_file}: labels have shape {labels.shape}, expected one label per image")
    if len(images) != len(labels):
        raise DataError(f"{images_file}: {len(images)} images but {len(labels)} labels")
    if len(labels) and labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{labels_file}: label {int(labels[bad])} at index {bad}; MNIST labels are 0 to 9")


def load_mnist(data_dir: Path, download: bool = False) -> Mnist:
    """Load (once per process) and split MNIST."""
    key = (str(Path(data_dir).expanduser().resolve()), download)
    if key not in _CACHE:
        folder = ensure_mnist(Path(data_dir), download)
        arrays = {
            name: read_idx(folder / filename, IMAGES_MAGIC if name.endswith("images") else LABELS_MAGIC)
            for name, filename in FILES.items()
        }
        for kind in ("train", "test"):
            check_contents(folder, kind, arrays[f"{kind}_images"], arrays[f"{kind}_labels"])
        images = torch.from_numpy(arrays["train_images"].copy())
        labels = torch.from_numpy(arrays["train_labels"].astype(np.int64))
        cut = min(TRAIN_SIZE, len(labels) * 5 // 6)  # tiny test files keep the 5:1 ratio
        _CACHE[key] = Mnist(
            train=Split(images[:cut], labels[:cut]),
            val=Split(images[cut:], labels[cut:]),
            test=Split(
                torch.from_numpy(arrays["test_images"].copy()),
                torch.from_numpy(arrays["test_labels"].astype(np.int64)),
            ),
        )
    return _CACHE[key]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (tests make tiny data sets with this)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_synthetic_mnist(data_dir: Path, n_train: int = 600, n_test: int = 100, seed: int = 0) -> Path:
    """A small learnable MNIST-shaped data set in torchvision's layout; returns data_dir.

    Each class is a distinct blob pattern plus noise, so a CNN learns it in one epoch.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 2, size=(10, 7, 7)).astype(np.float32)
    prototypes = np.kron(prototypes, np.ones((4, 4), dtype=np.float32)) * 200

    def make(n: int):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = prototypes[labels] + rng.normal(0, 30, size=(n, 28, 28))
        return np.clip(images, 0, 255).astype(np.uint8), labels

    folder = Path(data_dir) / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for kind, n in (("train", n_train), ("t10k", n_test)):
        images, labels = make(n)
        write_idx(folder / f"{kind}-images-idx3-ubyte", images)
        write_idx(folder / f"{kind}-labels-idx1-ubyte", labels)
    return Path(data_dir)

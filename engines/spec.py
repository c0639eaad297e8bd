"""What the engines and the master both read: the wire types and their constants, with no torch.

Engines return plain data (ZeroMQ carries dicts, never our classes, and the master must not import
torch); the master reads a task's result back through :class:`TaskResult` here, the same record the
engine filled in. A slave has this package and no ``controller``, so what both sides name lives here,
and nothing here imports more than the standard library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


class DataError(Exception):
    """A data set, a data file or a stored row is missing or malformed; the message names it."""

    exit_status = 1  # controller.errors.ExitStatus.ERROR (an int here: slaves cannot import controller)


# The L1 convention a run's params record (``l1_scale``): "batches" divides l1 * sum(|w|) by the training
# batches per epoch, as the paper's code does; runs stored without the key used "none".
L1_SCALE = "batches"
LEGACY_L1_SCALE = "none"


def stored_params(params: dict) -> dict:
    """A stored run's params as an engine spec: runs from before the convention was recorded keep theirs."""
    return {"l1_scale": LEGACY_L1_SCALE, **params}


# Why a task ended before its epochs were done (engines/process/stopping.py asks for the first two)
DRAIN = "drain"  # the master is turning the engine's slave off
NOTICE = "notice"  # the cloud takes the instance back (a spot interruption notice)
TIME = "time"  # the task ran for [training] task_seconds
STOP_REASONS = (DRAIN, NOTICE, TIME)
# the engine is going away: it gets no further task
ENGINE_GOING = (DRAIN, NOTICE)

# evaluation and inference batch on a GPU; the CPU's batches divide it, so inference shards cut at its
# multiples (controller/work/inference.py) hold whole batches on any device
EVAL_BATCH = 1000

# the data sets' files as torchvision lays them out under a data_dir (the master copies them to slaves)
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"


def mnist_raw_dir(data_dir: Path | str) -> Path:
    """DATA_DIR/MNIST/raw (torchvision's layout), or DATA_DIR itself if the files are there."""
    data_dir = Path(data_dir).expanduser()
    if (data_dir / MNIST_FILES["train_images"]).exists():
        return data_dir
    return data_dir / "MNIST" / "raw"


def dataset_files(data_dir: Path | str) -> dict[str, Path]:
    """The complete data sets under ``data_dir``, file by file: path under a data_dir -> the file here."""
    found: dict[str, Path] = {}
    mnist = mnist_raw_dir(data_dir)
    if all((mnist / name).is_file() for name in MNIST_FILES.values()):
        found.update({f"MNIST/raw/{name}": mnist / name for name in MNIST_FILES.values()})
    cifar = Path(data_dir).expanduser() / CIFAR_FOLDER
    if all((cifar / name).is_file() for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE)):
        found.update({f"{CIFAR_FOLDER}/{name}": cifar / name for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE)})
    return found


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
    """What one task returns, as a dict on the wire: the engine fills it in, the master reads it back with
    :meth:`from_dict` (fields a distributed rank adds, such as ``weights``, are dropped there)."""

    run_id: str = ""
    epochs: list[dict] = field(default_factory=list)  # EpochMetrics of the epochs this task finished
    checkpoint: Optional[bytes] = None  # None: the engine keeps it (``held``) and has not shipped it yet
    completed_epochs: int = 0  # whole epochs of the run done
    host: str = ""
    pid: int = 0
    device: str = ""
    threads: int = 0
    diverged: bool = False
    batches_done: int = 0  # batches of epoch completed_epochs + 1 done: where the checkpoint stands
    epoch_batches: int = 0  # batches per epoch (0: unknown)
    batches_run: int = 0  # batches this task trained (0: it returned the checkpoint it was given)
    stopped: Optional[str] = None  # why it ended early: one of STOP_REASONS
    held: bool = False  # this engine keeps the checkpoint: the run's next task may refer to it

    @classmethod
    def from_dict(cls, values: dict) -> "TaskResult":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def position(self) -> tuple[int, int]:
        """(whole epochs, batches of the next epoch) where the run stands after this task."""
        return self.completed_epochs, self.batches_done

    @property
    def shipped(self) -> bool:
        """The checkpoint's bytes came with the result (the master can store it)."""
        return self.checkpoint is not None

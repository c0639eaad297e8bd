"""The standard workloads of ``cluster bench``: the one table the CLI, the runner and ``cluster infer`` read.

Nothing here imports ipyparallel or torch: building the argument parser reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from controller.errors import UsageError
from controller.work.sweep.space import PAPER_L1  # the paper's λ grid, one definition for sweeps and benches


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    kind: str  # mnist or cifar: which engine task and which spec
    default_epochs: Optional[int]  # per training run; None = [training] epochs
    model: str = ""

    def runs(self, epochs: Optional[int]) -> list[tuple[str, dict]]:
        """(label, spec overrides) per training run of the workload."""
        epochs = epochs or self.default_epochs
        extra = {"epochs": epochs} if epochs else {}
        if self.name == "paper":
            return [(f"l1={l1:g}", {"l1": l1, **extra}) for l1 in PAPER_L1]
        return [(self.model or "cnn", extra)]


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("paper", "the paper's λ sweep: 9 L1 penalties, one epoch per trial", "mnist", 1),
        Workload("mnist-cnn", "one training run of the default CNN ([training] settings)", "mnist", None),
        Workload(
            "cifar10-vgg16",
            "torchvision VGG16 on CIFAR-10 (DATA_DIR/cifar-10-batches-py), 5 epochs",
            "cifar",
            5,
            "vgg16",
        ),
        Workload("cifar10-resnet18", "torchvision ResNet18 on CIFAR-10, 5 epochs", "cifar", 5, "resnet18"),
    )
}


def workload(name: str) -> Workload:
    """The workload of that name, or a UsageError listing the choices."""
    if name not in WORKLOADS:
        raise UsageError(f"--workload {name!r}: expected one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name]


def parse_engine_counts(text: Optional[str]) -> Optional[list[int]]:
    """'1,2,4' -> [1, 2, 4] (sorted, unique); None stays None (= every engine)."""
    if text is None or not str(text).strip():
        return None
    try:
        counts = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--engines {text!r}: expected engine counts like 1,2,4") from None
    if not counts or counts[0] < 1:
        raise UsageError(f"--engines {text!r}: every count must be 1 or more")
    return counts

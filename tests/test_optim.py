"""engines/optim.py against torch.optim itself: the same weights bit for bit, state dicts both ways,
and no torch._dynamo in a process that trains."""

import subprocess
import sys

import pytest
import torch

from engines import optim
from engines.loop import TrainingSpec, build_optimizer
from engines.workloads.cnn import MnistCNN

CASES = {
    "adam onecycle": dict(optimizer="adam", schedule="onecycle", momentum=0.0, weight_decay=0.0),
    "adam onecycle decay": dict(optimizer="adam", schedule="onecycle", momentum=0.0, weight_decay=1e-3),
    "adam constant": dict(optimizer="adam", schedule="constant", momentum=0.0, weight_decay=0.0),
    "sgd onecycle": dict(optimizer="sgd", schedule="onecycle", momentum=0.9, weight_decay=0.0),
    "sgd nesterov decay": dict(optimizer="sgd", schedule="onecycle", momentum=0.9, weight_decay=5e-4, nesterov=True),
    "sgd constant no momentum": dict(optimizer="sgd", schedule="constant", momentum=0.0, weight_decay=0.0),
    "sgd constant momentum": dict(optimizer="sgd", schedule="constant", momentum=0.5, weight_decay=1e-4),
}
STEPS_PER_EPOCH, EPOCHS = 5, 2


def spec_of(case: dict) -> TrainingSpec:
    return TrainingSpec(**{"lr": 0.01, "epochs": EPOCHS, **case})


def torch_optim(spec, model):
    """What engines/loop.py built before engines/optim.py: torch.optim with the same settings."""
    if spec.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=spec.lr,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
            nesterov=spec.nesterov,
        )
    total = spec.epochs * STEPS_PER_EPOCH
    if spec.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=spec.lr,
            total_steps=total,
            pct_start=max(0.25, 2 / total),
            cycle_momentum=spec.optimizer == "sgd",
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return optimizer, scheduler


def batches(n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 1, 28, 28, generator=generator), torch.randint(0, 10, (16,), generator=generator))
        for _ in range(n)
    ]


def train(model, optimizer, scheduler, data) -> list[float]:
    lrs = []
    for images, labels in data:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def model_pair():
    torch.manual_seed(3)
    ours = MnistCNN()
    theirs = MnistCNN()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), f"{name} differs by up to {(x - y).abs().max().item()}"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_run_gives_torch_optims_weights_bit_for_bit(case):
    spec = spec_of(case)
    ours, theirs = model_pair()
    data = batches(EPOCHS * STEPS_PER_EPOCH)
    our_lrs = train(ours, *build_optimizer(spec, ours, STEPS_PER_EPOCH), data)
    their_lrs = train(theirs, *torch_optim(spec, theirs), data)
    assert our_lrs == their_lrs
    assert_same_weights(ours, theirs)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_checkpoint_moves_between_torch_optim_and_ours_in_both_directions(case):
    """Checkpoints written by engines before engines/optim.py resume here; and the other way round."""
    spec = spec_of(case)
    data = batches(EPOCHS * STEPS_PER_EPOCH)
    half = len(data) // 2
    for first, second in ((torch_optim, build_optimizer_for), (build_optimizer_for, torch_optim)):
        reference, resumed = model_pair()
        train(reference, *first(spec, reference), data)

        writer, _ = model_pair()
        optimizer, scheduler = first(spec, writer)
        train(writer, optimizer, scheduler, data[:half])
        saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}

        resumed.load_state_dict(writer.state_dict())
        optimizer, scheduler = second(spec, resumed)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        train(resumed, optimizer, scheduler, data[half:])
        assert_same_weights(reference, resumed)


def build_optimizer_for(spec, model):
    return build_optimizer(spec, model, STEPS_PER_EPOCH)


def test_state_follows_its_parameter_and_the_step_count_stays_a_cpu_scalar():
    model = torch.nn.Linear(3, 2)
    optimizer = optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"].double()
    saved["state"][1]["step"] = 1.0  # as torch before 1.12 saved it
    optimizer.load_state_dict(saved)
    assert optimizer.state[0]["exp_avg"].dtype == torch.float32
    for index in (0, 1):
        step = optimizer.state[index]["step"]
        assert step.dtype == torch.float32 and step.device.type == "cpu" and step.item() == 1.0
    optimizer.step()
    assert optimizer.state[1]["step"].item() == 2.0


def test_a_state_dict_for_another_model_is_refused_by_name():
    optimizer = optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    other = optim.SGD(torch.nn.Linear(3, 2, bias=False).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="state for \\[1\\] parameters.*this model has 2"):
        optimizer.load_state_dict(other.state_dict())


def test_a_schedule_stepped_past_its_end_says_so():
    optimizer = optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9)
    scheduler = optim.OneCycle(optimizer, max_lr=0.1, total_steps=3, pct_start=0.5, cycle_momentum=True)
    for _ in range(3):
        scheduler.step()
    with pytest.raises(ValueError, match="stepped 4 times; the schedule has 3 steps"):
        scheduler.step()


def test_an_engine_that_trains_mnist_never_imports_torch_dynamo():
    """The point of engines/optim.py: torch._dynamo costs an engine about 2.4 s of CPU to import. (CIFAR tasks
    import it with torchvision, data-parallel ranks with DistributedDataParallel: docs/elastic.md.)"""
    script = (
        "import sys, torch\n"
        "from engines.workloads.cnn import MnistCNN\n"
        "from engines.loop import TrainingSpec, build_optimizer\n"
        "model = MnistCNN()\n"
        "for name in ('adam', 'sgd'):\n"
        "    spec = TrainingSpec(optimizer=name, schedule='onecycle', lr=0.01, momentum=0.9, epochs=1)\n"
        "    optimizer, scheduler = build_optimizer(spec, model, 4)\n"
        "    model(torch.randn(2, 1, 28, 28)).sum().backward()\n"
        "    optimizer.step(); scheduler.step(); optimizer.zero_grad()\n"
        "    optimizer.load_state_dict(optimizer.state_dict())\n"
        "print(sorted(name for name in sys.modules if name.startswith('torch._dynamo')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

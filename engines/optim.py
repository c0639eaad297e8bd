"""Adam, SGD and their learning-rate schedules, without torch.optim.

Why not torch.optim: every one of its optimizers imports torch._dynamo on its first call (the methods
are wrapped by ``torch._disable_dynamo``, and ``step`` by a graph break for torch.compile).  That import
pulls in sympy and torch.distributed.fsdp: about 2.4 s of CPU and 10% more memory in every engine, for
a compiler the engines never use.  Here, on a 2-core master, it was the largest single cost of
starting an engine after torch itself.

The arithmetic is torch.optim's (torch 2.14), operation for operation, so a run gives bit-for-bit the
weights torch.optim would (on the CPU, where torch takes its per-tensor path; the foreach ops used here
run the same kernels tensor by tensor there).  ``state_dict`` has torch.optim's layout, both ways: a
checkpoint written by an engine that used torch.optim resumes here, and the other way round.
tests/test_optim.py holds both promises against torch.optim itself.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Union

import torch

Group = dict[str, Any]
# what torch's _foreach_ kernels take and give back
Tensors = Union[list[torch.Tensor], tuple[torch.Tensor, ...]]


class Optimizer:
    """One parameter group; ``state`` per parameter index, as torch.optim's state dicts hold it."""

    defaults: Group

    def __init__(self, params: Iterable[torch.Tensor], defaults: Group):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.defaults = defaults
        self.param_groups: list[Group] = [{**defaults, "params": self.params}]
        self.state: dict[int, dict[str, Any]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.detach_().zero_()

    def state_dict(self) -> dict[str, Any]:
        groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "params": list(range(len(self.params)))}
            for group in self.param_groups
        ]
        return {"state": {index: dict(entry) for index, entry in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(
                f"optimizer state for {[len(g['params']) for g in groups]} parameters in "
                f"{len(groups)} group(s); this model has {len(self.params)} in one group"
            )
        self.param_groups = [
            {**self.defaults, **{k: v for k, v in groups[0].items() if k != "params"}, "params": self.params}
        ]
        self.state = {}
        for index, entry in state_dict["state"].items():
            param = self.params[int(index)]
            # as torch.optim: the step count stays where it was (a CPU scalar; a plain number in checkpoints of
            # torch before 1.12), the rest follows its parameter
            self.state[int(index)] = {
                key: (value if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float32))
                if key == "step"
                else value
                if not isinstance(value, torch.Tensor)
                else value.to(device=param.device, dtype=param.dtype if value.is_floating_point() else value.dtype)
                for key, value in entry.items()
            }

    def _grads(self, indices: list[int]) -> list[torch.Tensor]:
        """The gradients of these parameters (``_with_grads`` chose them: each has one)."""
        return [grad for i in indices if (grad := self.params[i].grad) is not None]

    def _with_grads(self) -> list[int]:
        return [index for index, param in enumerate(self.params) if param.grad is not None]


class Adam(Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(
            params,
            {
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": weight_decay,
                "amsgrad": False,
                "maximize": False,
                "foreach": None,
                "capturable": False,
                "differentiable": False,
                "fused": None,
                "decoupled_weight_decay": False,
            },
        )

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        indices = self._with_grads()
        if not indices:
            return
        for index in indices:
            if index not in self.state:
                param = self.params[index]
                self.state[index] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }
        params = [self.params[i] for i in indices]
        grads: Tensors = self._grads(indices)
        exp_avgs = [self.state[i]["exp_avg"] for i in indices]
        exp_avg_sqs = [self.state[i]["exp_avg_sq"] for i in indices]
        steps = [self.state[i]["step"] for i in indices]
        torch._foreach_add_(steps, 1)
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        counts = [step.item() for step in steps]
        step_sizes = [(lr / (1 - beta1**count)) * -1 for count in counts]
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [(1 - beta2**count) ** 0.5 for count in counts])
        torch._foreach_add_(denominators, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)


class SGD(Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs a momentum above 0")
        super().__init__(
            params,
            {
                "lr": lr,
                "momentum": momentum,
                "dampening": 0,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
                "maximize": False,
                "foreach": None,
                "differentiable": False,
                "fused": None,
            },
        )

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        dampening, nesterov = group["dampening"], group["nesterov"]
        indices = self._with_grads()
        if not indices:
            return
        params = [self.params[i] for i in indices]
        grads: Tensors = self._grads(indices)
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        if momentum != 0:
            kept = [self.state.get(index, {}).get("momentum_buffer") for index in indices]
            buffers: list[torch.Tensor] = [buffer for buffer in kept if buffer is not None]
            if len(buffers) == len(kept):  # every step but the first: two kernels in all
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, list(grads), alpha=1 - dampening)
            else:
                buffers = []
                for index, grad, buffer in zip(indices, grads, kept):
                    if buffer is None:  # the first step: the gradient itself, as torch.optim starts it
                        buffer = grad.detach().clone()
                        self.state[index] = {"momentum_buffer": buffer}
                    else:
                        buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
                    buffers.append(buffer)
            if nesterov:
                grads = torch._foreach_add(grads, buffers, alpha=momentum)
            else:
                grads = buffers
        torch._foreach_add_(params, grads, alpha=-lr)


class Schedule:
    """Sets the group's learning rate before each optimizer step: call ``step()`` after each of them.

    The first learning rate is set on construction, as torch.optim.lr_scheduler does (its "step 0")."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        group = optimizer.param_groups[0]
        group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"]]
        self.last_epoch = -1
        self._step_count = 0
        self.step()

    def step(self) -> None:
        self._step_count += 1
        self.last_epoch += 1
        group = self.optimizer.param_groups[0]
        group["lr"] = self._lr(group)
        self._last_lr = [group["lr"]]

    def _lr(self, group: Group) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in vars(self).items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a checkpoint written through torch.optim.lr_scheduler holds more keys: only these are ours
        for key in self.state_dict():
            if key in state_dict:
                setattr(self, key, state_dict[key])


class Constant(Schedule):
    """torch.optim.lr_scheduler.LambdaLR with ``lambda step: 1.0``."""

    def __init__(self, optimizer: Optimizer):
        self.lr_lambdas = [None]  # LambdaLR's key: it keeps no lambda in a state dict either
        self._get_lr_called_within_step = False
        super().__init__(optimizer)

    def _lr(self, group: Group) -> float:
        return self.base_lrs[0] * 1.0


class OneCycle(Schedule):
    """torch.optim.lr_scheduler.OneCycleLR, two phases, cosine: from max_lr/25 up to max_lr over
    ``pct_start`` of the steps, then down to max_lr/25/1e4; with ``cycle_momentum`` (SGD) the momentum
    goes the other way, from 0.95 to 0.85 and back."""

    DIV_FACTOR, FINAL_DIV_FACTOR = 25.0, 1e4
    BASE_MOMENTUM, MAX_MOMENTUM = 0.85, 0.95

    def __init__(self, optimizer: Optimizer, max_lr: float, total_steps: int, pct_start: float, cycle_momentum: bool):
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps {total_steps!r}: expected a positive integer")
        if not 0 <= pct_start <= 1:
            raise ValueError(f"pct_start {pct_start!r}: expected a number from 0 to 1")
        self.total_steps = total_steps
        self._schedule_phases: list[dict[str, Any]] = [
            {
                "end_step": float(pct_start * total_steps) - 1,
                "start_lr": "initial_lr",
                "end_lr": "max_lr",
                "start_momentum": "max_momentum",
                "end_momentum": "base_momentum",
            },
            {
                "end_step": total_steps - 1,
                "start_lr": "max_lr",
                "end_lr": "min_lr",
                "start_momentum": "base_momentum",
                "end_momentum": "max_momentum",
            },
        ]
        self._anneal_func_type = "cos"
        self.cycle_momentum = cycle_momentum
        self.use_beta1 = "betas" in optimizer.defaults
        self._get_lr_called_within_step = False
        group = optimizer.param_groups[0]
        group["initial_lr"] = max_lr / self.DIV_FACTOR
        group["max_lr"] = max_lr
        group["min_lr"] = group["initial_lr"] / self.FINAL_DIV_FACTOR
        if cycle_momentum:
            if self.use_beta1:
                group["betas"] = (self.MAX_MOMENTUM, *group["betas"][1:])
            elif "momentum" in optimizer.defaults:
                group["momentum"] = self.MAX_MOMENTUM
            else:
                raise ValueError("cycle_momentum needs an optimizer with momentum or betas")
            group["max_momentum"] = self.MAX_MOMENTUM
            group["base_momentum"] = self.BASE_MOMENTUM
        super().__init__(optimizer)

    @staticmethod
    def _anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def _lr(self, group: Group) -> float:
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(f"stepped {step} times; the schedule has {self.total_steps} steps")
        start_step = 0.0
        for i, phase in enumerate(self._schedule_phases):
            if step <= phase["end_step"] or i == len(self._schedule_phases) - 1:
                pct = (step - start_step) / (phase["end_step"] - start_step)
                if self.cycle_momentum:
                    momentum = self._anneal(group[phase["start_momentum"]], group[phase["end_momentum"]], pct)
                    if self.use_beta1:
                        group["betas"] = (momentum, *group["betas"][1:])
                    else:
                        group["momentum"] = momentum
                return self._anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct)
            start_step = phase["end_step"]
        raise AssertionError("unreachable: the last phase always matches")

"""One run on several engines at once: data-parallel training with torch.distributed.

Every task of a distributed run is one epoch on every engine of the run's set.  The
master asks the rank-0 engine for a free port on its own host (``free_port``), then
sends ``train_ranked`` to each engine with its rank and that address.  The ranks meet
in a ``TCPStore`` served by rank 0, form a process group (gloo on CPU, NCCL on CUDA)
and train the model wrapped in ``DistributedDataParallel``.

The global batch stays ``batch_size`` whatever the engine count: every rank walks the
same seeded order of global batches and trains on its contiguous slice of each
(``engines.loop.Shard``), so one epoch on k engines takes the same steps as one
engine would, and a run resumed on another engine count goes on where it stopped.

Failures never hang a rank: the store's connection gives up after
``RENDEZVOUS_TIMEOUT_S`` and every collective after ``COLLECTIVE_TIMEOUT_S`` (a
peer killed outright breaks its sockets, which fails the collectives at once);
the process group is destroyed whatever happens, so the engine is ready for the
next task.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import logging
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from engines.loop import ProgressFn, Setup, Shard, TrainingSpec, pick_device, run_task
from engines.workloads.mnist import RunSpec, mnist_setup

log = logging.getLogger(__name__)

RENDEZVOUS_TIMEOUT_S = 20.0  # connecting to rank 0's store
COLLECTIVE_TIMEOUT_S = 25.0  # forming the group and every all-reduce: both well inside 30 s


class RendezvousError(RuntimeError):
    """The ranks of a distributed task could not meet; the message names the address and port."""


@dataclass
class Rendezvous:
    """Where and as whom a rank joins its group; sent by the master as a dict."""

    address: str
    port: int
    rank: int
    world: int
    rendezvous_timeout_s: float = RENDEZVOUS_TIMEOUT_S
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S

    @property
    def where(self) -> str:
        return f"{self.address}:{self.port}"


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def local_address(toward: str = "") -> str:
    """This host's address on the route toward ``toward`` (the controller's address), without sending."""
    if toward:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((toward, 9))  # UDP connect only picks a route
                return probe.getsockname()[0]
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


# where rendezvous ports are looked for: below the kernel's ephemeral range (Linux: 32768-60999)
RENDEZVOUS_PORTS = (20000, 32768)
LOCAL_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port(toward: str = "") -> dict:
    """A free TCP port on this host for rank 0's store, and this host's name and address.

    Not one the OS picks (port 0): that comes from the ephemeral range, which every outgoing connection
    draws its local port from, so between this pick and the store's bind a connection could take it, and
    rank 0 would fail at once with EADDRINUSE (the likely cause of a rank 0 that gave up 1.7 s into a 3 s
    rendezvous timeout in one run of the test suite). A port below the ephemeral range is only
    ever taken by a process that binds it on purpose."""
    low, high = RENDEZVOUS_PORTS
    try:
        high = min(high, int(LOCAL_PORT_RANGE.read_text().split()[0]))
    except (OSError, ValueError, IndexError):  # not Linux: keep the default range
        pass
    candidates = random.sample(range(low, high), min(200, max(0, high - low)))
    for port in [*candidates, 0]:  # port 0 last: whatever the OS gives, if no candidate binds
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            port = sock.getsockname()[1]
            break
    return {"host": socket.gethostname(), "address": local_address(toward), "port": port}


def join_group(rendezvous: Rendezvous, device: torch.device) -> None:
    """Meet the other ranks at rank 0's store and form the process group, or fail naming the address."""
    try:
        if rendezvous.rank:
            # TCPStore retries a refused connection for up to twice its timeout: a plain probe keeps the bound
            wait_for_port(rendezvous.address, rendezvous.port, rendezvous.rendezvous_timeout_s)
        store = dist.TCPStore(
            rendezvous.address,
            rendezvous.port,
            rendezvous.world,
            is_master=rendezvous.rank == 0,
            timeout=datetime.timedelta(seconds=rendezvous.rendezvous_timeout_s),
            wait_for_workers=False,
        )
    except Exception as error:  # noqa: BLE001 - DistNetworkError, TimeoutError, RuntimeError, by torch version
        raise RendezvousError(
            f"rank {rendezvous.rank} of {rendezvous.world} could not reach the rendezvous at {rendezvous.where} "
            f"within {rendezvous.rendezvous_timeout_s:.0f} s ({type(error).__name__}: {_first_line(error)}); "
            f"the engines must reach each other on that port (AWS: the cluster's security group allows "
            f"traffic inside the group)"
        ) from None
    try:
        dist.init_process_group(
            backend_for(device),
            store=store,
            rank=rendezvous.rank,
            world_size=rendezvous.world,
            timeout=datetime.timedelta(seconds=rendezvous.collective_timeout_s),
        )
        # one all-reduce now: a peer that cannot be reached fails here, not in the first training step
        probe = torch.ones(1, device=device)
        dist.all_reduce(probe)
    except Exception as error:  # noqa: BLE001 - NCCL and gloo raise their own kinds: every one becomes a RendezvousError
        leave_group()
        raise RendezvousError(
            f"rank {rendezvous.rank} of {rendezvous.world}: the process group at {rendezvous.where} did not form "
            f"within {rendezvous.collective_timeout_s:.0f} s ({type(error).__name__}: {_first_line(error)})"
        ) from None


def wait_for_port(address: str, port: int, timeout_s: float) -> None:
    """Return once something accepts connections at address:port; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"nothing accepted a connection within {timeout_s:.0f} s")
        try:
            with socket.create_connection((address, port), timeout=min(left, 5.0)):
                return
        except OSError:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def leave_group() -> None:
    """Destroy the process group (after a failure too), so the engine can join a new one later."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group: its resources go with it either way
            log.warning("destroying the process group failed", exc_info=True)


class HoldAt(nn.Module):
    """A deterministic point to inject a fault at (tests): before forward number ``step`` of the task,
    write ``dir/rank-R.ready`` (holding the pid) and wait until ``dir/go`` exists."""

    def __init__(self, inner: nn.Module, rank: int, step: int, folder: str, wait_s: float = 120.0):
        super().__init__()
        self.inner, self.rank, self.step, self.folder, self.wait_s = inner, rank, step, Path(folder), wait_s
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.step:
            import os

            (self.folder / f"rank-{self.rank}.ready").write_text(str(os.getpid()))
            deadline = time.monotonic() + self.wait_s
            while not (self.folder / "go").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.folder / 'go'} did not appear within {self.wait_s:.0f} s")
                time.sleep(0.02)
        return self.inner(*args, **kwargs)


def setup_for(spec: dict) -> tuple[TrainingSpec, Callable[[torch.device], Setup]]:
    """The run's spec object and its workload's setup (MNIST's CNN, or a CIFAR model named by ``model``)."""
    if spec.get("model"):
        from engines.workloads.cifar import CifarSpec, cifar_setup

        cifar = CifarSpec.from_dict(spec)
        return cifar, lambda device: cifar_setup(cifar, device)
    mnist = RunSpec.from_dict(spec)
    return mnist, lambda device: mnist_setup(mnist, device)


def weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter: equal on every rank after a data-parallel step.  (Buffers such as batch
    norm's running statistics are broadcast from rank 0 at each forward, then updated per rank: rank 0's
    are the ones checkpointed.)"""
    digest = hashlib.sha256()
    for name, value in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_ranked(
    spec: dict,
    checkpoint: Optional[bytes],
    n_epochs: Optional[int],
    rendezvous: dict,
    progress: Optional[ProgressFn] = None,
    hold: Optional[dict] = None,
) -> dict:
    """This engine's rank of a distributed task; returns engines.loop.TaskResult as a dict plus
    ``rank``, ``world``, ``backend`` and ``weights`` (the digest).  Only rank 0 returns a checkpoint
    and evaluates; its metrics are the run's."""
    place = Rendezvous(**rendezvous)
    run_spec, setup = setup_for(spec)
    if run_spec.threads:
        torch.set_num_threads(run_spec.threads)
    if run_spec.batch_size < place.world:
        raise ValueError(
            f"batch_size {run_spec.batch_size} is smaller than the {place.world} engines "
            f"it is split over; the global batch must be at least the engine count"
        )
    device = pick_device(run_spec.device)
    built: dict[str, nn.Module] = {}

    def keep(device: torch.device) -> Setup:
        work = setup(device)
        built["model"] = work.model
        return work

    def wrap(model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        net = model
        if place.world > 1:
            net = DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
        return HoldAt(net, place.rank, int(hold["step"]), hold["dir"]) if hold else net

    if place.world > 1:  # one engine left (or chosen) trains as a plain run would: no group, no DDP hooks
        # DistributedDataParallel imports torch._dynamo as it is built (2 s of CPU and more on a loaded
        # slave, once per engine; engines/optim.py spares every other task it): here, before the group
        # forms, so that no rank makes the others wait for it inside their first collective
        importlib.import_module("torch._dynamo")  # not `import torch._dynamo`: that makes `torch` local here

        join_group(place, device)
    try:
        result = run_task(
            run_spec,
            keep,
            checkpoint,
            n_epochs,
            progress if place.rank == 0 else None,
            shard=Shard(place.rank, place.world, wrap),
            device=device,
        )
    finally:
        leave_group()
    out = dataclasses.asdict(result)
    out.update(rank=place.rank, world=place.world, backend=backend_for(device), weights=weights_digest(built["model"]))
    return out


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""

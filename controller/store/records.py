"""The rows of the store's own tables as dataclasses (the columns are in controller/store/schema.py)."""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

RUN_STATES = ("running", "completed", "failed", "interrupted", "pruned")


@dataclass
class ClusterRecord:
    id: int
    name: str
    provider: str
    state: str
    slaves: int
    threads_per_engine: int
    profile_dir: str
    ipp_cluster_id: str
    created_at: float
    controller_pid: Optional[int] = None
    stopped_at: Optional[float] = None
    price_per_hour: float = 0.0
    error: Optional[str] = None
    target: Optional[int] = None  # slaves to keep; None: as started (a store from before resizing)
    min_slaves: int = 0
    max_slaves: int = 0  # 0: no autoscaling
    idle_minutes: float = 0.0
    replace_lost: bool = False
    keeper_pid: Optional[int] = None


@dataclass
class EngineRecord:
    engine_id: int
    host: str
    pid: int
    device: str
    threads: int
    node_id: str = ""
    registered_at: float = 0.0
    leaving: str = ""  # drain, notice, lost: the scheduler sends it no new task


class NodeState(enum.StrEnum):
    """A node's states: ours, and EC2's instance states, which the aws provider records as EC2 names them."""

    STARTING = "starting"  # being brought up: a local engine set started, an SSH host picked
    PENDING = "pending"  # EC2: launched, not running yet
    BOOTSTRAPPING = "bootstrapping"  # reached over SSH; its engines being started
    RUNNING = "running"
    DRAINING = "draining"  # its engines finish their tasks before it is released
    SHUTTING_DOWN = "shutting-down"  # EC2
    STOPPING = "stopping"  # EC2
    STOPPED = "stopped"
    TERMINATED = "terminated"
    GONE = "gone"  # no longer in the cloud's list, though nobody here released it
    LOST = "lost"  # its engines died, or it did not answer: released as lost


# a node in one of these states serves the cluster (or soon will); the others are gone or going
LIVE_NODE_STATES = (NodeState.STARTING, NodeState.BOOTSTRAPPING, NodeState.RUNNING, NodeState.PENDING)
PENDING_NODE_STATES = (NodeState.STARTING, NodeState.BOOTSTRAPPING, NodeState.PENDING)
# no longer billed
RELEASED_NODE_STATES = (NodeState.TERMINATED, NodeState.STOPPED, NodeState.GONE, NodeState.LOST)


@dataclass
class NodeRecord:
    node_id: str
    provider: str
    host: str = ""
    state: str = ""  # a NodeState, or EC2's word for an instance the store does not know ("untracked (...)")
    instance_id: str = ""
    instance_type: str = ""
    zone: str = ""
    market: str = ""
    price_per_hour: float = 0.0
    public_ip: str = ""
    private_ip: str = ""
    image: str = ""
    engines: int = 0
    launched_at: float = 0.0
    terminated_at: Optional[float] = None
    ssh_host: str = ""  # where bootstrap reached it over SSH: `cluster ssh` and stop use the same address
    ssh_port: int = 0
    idle_since: Optional[float] = None  # every engine idle since then (autoscaling stops it after idle_minutes)
    note: str = ""  # why it was started or released


@dataclass
class EventRecord:
    """A resize decision or a fault handled, with its reason (shown by `cluster status`)."""

    cluster_id: int
    at: float
    kind: str
    detail: str


@dataclass
class RunRecord:
    id: str
    params: dict
    state: str = "running"
    cluster_id: Optional[int] = None
    sweep_id: Optional[str] = None
    trial_number: Optional[int] = None
    engine_id: Optional[int] = None
    host: Optional[str] = None
    device: Optional[str] = None
    created_at: float = field(default_factory=time.time)
    finished_at: Optional[float] = None
    seconds: float = 0.0
    epochs_done: int = 0  # whole epochs
    batches_done: int = 0  # of the epoch in progress (epochs_done + 1), when its last task ended mid-epoch
    epoch_batches: int = 0  # batches per epoch (0: not known yet)
    train_loss: Optional[float] = None
    val_accuracy: Optional[float] = None
    test_accuracy: Optional[float] = None
    images_per_s: Optional[float] = None
    error: Optional[str] = None


@dataclass
class EpochRecord:
    run_id: str
    epoch: int
    train_loss: float
    val_accuracy: float
    test_accuracy: float
    seconds: float
    train_seconds: float
    images_per_s: float
    lr: float
    engine_id: Optional[int] = None
    finished_at: float = field(default_factory=time.time)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"

"""The ipyparallel controller of a cluster: its settings, its start (and restart when a port was taken), and
whether it still runs.

Named after ipyparallel's ``ipcluster`` command, which does the same by hand.

ipyparallel's own ``Cluster`` starts and stops the controller and the engine
launchers and writes its state to a cluster file after every change; we keep
that file (and the connection files, which carry the HMAC key) in a profile
under state_dir, so clusters with different state_dirs never see each other.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path
from typing import Callable, Optional

import ipyparallel as ipp

from controller.errors import ProviderError
from controller.ipp.processes import is_marked, pid_alive, process_marker
from controller.ipp.profile import EVERY_INTERFACE, HEARTBEAT_MS, LOOPBACK, engine_args, engine_file, is_loopback
from controller.store import ClusterRecord

log = logging.getLogger(__name__)


def controller_args(engine_ip: str) -> list[str]:
    """Where the controller listens, port group by port group.

    Clients (this tool, notebooks) and the monitor run on the master: loopback, always
    (the one exception: engines on every interface, below).  Engines: only the address
    that reaches the slaves (loopback for local engines and for SSH tunnels).  Once engine
    ports are reachable from the network, CurveZMQ encrypts every connection and admits only
    peers that hold the controller's public key, which travels in the 0600 connection files
    and nowhere else.
    """
    # clients and engines share the registration port, and one socket cannot bind a port on
    # 127.0.0.1 and on every interface: with engines on every interface, clients are too (CurveZMQ)
    client_ip = engine_ip if engine_ip in EVERY_INTERFACE else LOOPBACK
    args = [
        f"--IPController.engine_ip={engine_ip}",
        f"--IPController.client_ip={client_ip}",
        f"--IPController.monitor_ip={LOOPBACK}",
    ]
    if not is_loopback(engine_ip):
        args.append("--IPController.enable_curve=True")  # the controller makes its key pair itself
    return args


# The hub's in-memory task database keeps every task's arguments and result (each carries a checkpoint):
# the master stores results itself, so the controller keeps none and its memory stays flat.
# The hub pings engines every 0.8 s and drops one after 4 missed pongs: a slave that vanished without a
# word (a spot instance taken back, a frozen machine) is noticed within 5 s, not ipyparallel's 33 s.
CONTROLLER_ARGS = [
    "--IPController.db_class=NoDB",
    f"--HeartMonitor.period={HEARTBEAT_MS}",
    "--HeartMonitor.max_heartmonitor_misses=4",
]


def new_cluster(
    profile: Path,
    cluster_id: str,
    *,
    engine_env: dict[str, str],
    engine_ip: str = LOOPBACK,
    engines: str | type = "local",
    engine_timeout: int = 120,
    master_grace_minutes: float = 10.0,
) -> ipp.Cluster:
    """An ipyparallel Cluster that outlives this process (shutdown_atexit=False). ``engines``: the local engine
    launcher (a cluster's own: controller/ipp/forked_engines.py, engines forked from a server)."""
    from traitlets.config import Config

    config = Config()
    marker = process_marker(profile, cluster_id)
    controller_env = dict(marker)
    if not is_loopback(engine_ip):
        # ipyparallel drops HMAC signing under CurveZMQ unless a key is given; keep both (the key
        # goes by environment, readable by this user only, never on a command line)
        controller_env["IPP_SESSION_KEY"] = secrets.token_hex(32)
    config.LocalControllerLauncher.environment = controller_env
    config.LocalEngineSetLauncher.environment = {**engine_env, **marker}
    config.LocalEngineLauncher.environment = {**engine_env, **marker}
    config.LocalEngineSetLauncher.engine_args = engine_args(master_grace_minutes)
    profile.mkdir(parents=True, exist_ok=True)
    os.chmod(profile, 0o700)
    return ipp.Cluster(
        profile_dir=str(profile),
        cluster_id=cluster_id,
        shutdown_atexit=False,
        controller_ip="",  # not --ip: that would bind client and monitor ports to the engines' address too
        controller_args=CONTROLLER_ARGS + controller_args(engine_ip),
        engines=engines,
        engine_timeout=engine_timeout,
        config=config,
        log_level=logging.WARNING,
        load_profile=False,
    )


def load_cluster(profile: Path, cluster_id: str) -> Optional[ipp.Cluster]:
    """Rebuild the Cluster from its file; None when the file is gone."""
    try:
        # load_profile=False as in new_cluster: our profiles hold no config files, and looking costs a second
        return ipp.Cluster.from_file(
            profile_dir=str(profile), cluster_id=cluster_id, log_level=logging.WARNING, load_profile=False
        )
    except FileNotFoundError:
        return None


def engine_set_pids(cluster: Optional[ipp.Cluster]) -> dict[int, str]:
    """Engine pid -> the id of the engine set that started it (local launchers only)."""
    if cluster is None:
        return {}
    return {
        launcher.pid: set_id
        for set_id, engine_set in cluster.engines.items()
        for launcher in getattr(engine_set, "launchers", {}).values()
        if getattr(launcher, "pid", None)
    }


def controller_pid(cluster: ipp.Cluster) -> Optional[int]:
    launcher = cluster.controller
    return getattr(launcher, "pid", None) if launcher is not None else None


# ipyparallel's controller picks its ports by binding port 0, closing, and binding again later: another
# process (a busy master opens connections all the time) can take one in between, and the controller exits
CONTROLLER_STARTS = 3
PORT_TAKEN = "Address already in use"


class ControllerExited(Exception):
    """The controller process ended before it wrote its connection files; ``output``: what it printed."""

    def __init__(self, pid: Optional[int], output: str):
        self.pid, self.output = pid, output
        lines = [line for line in output.strip().splitlines() if line.strip()]
        super().__init__(
            f"the controller (pid {pid}) exited as it started: "
            f"{' / '.join(lines[-3:]) if lines else 'it printed nothing'}"
        )


def wait_for_controller(cluster: ipp.Cluster, timeout: float, poll_s: float = 0.1) -> None:
    """Until the controller has written its engine connection file (the last it writes, once its sockets are
    bound). ControllerExited when it ends first; ProviderError after ``timeout``."""
    launcher, path = cluster.controller, engine_file(Path(cluster.profile_dir), cluster.cluster_id)
    pid = controller_pid(cluster)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not pid_alive(pid):
            raise ControllerExited(pid, launcher.get_output() if launcher is not None else "")
        if time.monotonic() > deadline:
            raise ProviderError(
                f"the controller (pid {pid}) wrote no engine connection file {path} within {timeout:.0f} s"
            )
        time.sleep(poll_s)


def start_controller(
    cluster: ipp.Cluster,
    timeout: float,
    on_start: Callable[[Optional[int]], None] = lambda pid: None,
    starts: int = CONTROLLER_STARTS,
) -> None:
    """Start the controller and wait until it listens; again (up to ``starts`` in all) when it exited because
    a port it had picked was taken meanwhile. Any other early exit is a ProviderError with its last words.
    ``on_start(pid)`` as each controller process starts, before the wait."""
    for attempt in range(1, starts + 1):
        cluster.start_controller_sync()
        on_start(controller_pid(cluster))
        try:
            wait_for_controller(cluster, timeout)
            return
        except ControllerExited as exited:
            cluster.stop_controller_sync()  # forgets the dead launcher, so that another can start
            if PORT_TAKEN not in exited.output or attempt == starts:
                raise ProviderError(str(exited)) from None
            log.warning(
                "the controller could not bind a port it had picked (%s; attempt %d of %d); starting it again",
                PORT_TAKEN,
                attempt,
                starts,
            )


def controller_alive(record: ClusterRecord) -> bool:
    """The record's controller still runs (its pid alive *and* carrying this cluster's marker)."""
    return is_marked(record.controller_pid, Path(record.profile_dir), record.ipp_cluster_id)

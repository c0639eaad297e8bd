"""The ipyparallel side of a cluster on the master: profile, controller, connection files, client.

Named after ipyparallel's ``ipcluster`` command, which does the same by hand.

ipyparallel's own ``Cluster`` starts and stops the controller and the engine
launchers and writes its state to a cluster file after every change; we keep
that file (and the connection files, which carry the HMAC key) in a profile
under state_dir, so clusters with different state_dirs never see each other.
"""
from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import ipyparallel as ipp

from controller.errors import ProviderError
from controller.ipp.processes import pid_alive, process_marker

log = logging.getLogger(__name__)


REPO_ROOT = Path(__file__).resolve().parents[2]


def engine_environment(threads: int) -> dict[str, str]:
    """The environment of a local engine: its torch threads, and this checkout's code on its path."""
    env = {
        "OMP_NUM_THREADS": str(threads or ""), "MKL_NUM_THREADS": str(threads or ""),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
    }
    return {k: v for k, v in env.items() if v}


def profile_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "profile"


def url_file(profile: Path, cluster_id: str) -> Path:
    """The client connection file: a plain ``ipyparallel.Client(path)`` can use it."""
    return Path(profile) / "security" / f"ipcontroller-{cluster_id}-client.json"


def engine_file(profile: Path, cluster_id: str) -> Path:
    return Path(profile) / "security" / f"ipcontroller-{cluster_id}-engine.json"


LOOPBACK = "127.0.0.1"
EVERY_INTERFACE = ("0.0.0.0", "*", "::")


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("localhost", "::1")


def controller_args(engine_ip: str) -> list[str]:
    """Where the controller listens, port group by port group.

    Clients (this tool, notebooks) and the monitor run on the master: loopback, always
    (the one exception: engines on every interface, below).  Engines: only the address
    that reaches the slaves (loopback for local engines and for SSH tunnels).  Once engine ports are reachable from the network, CurveZMQ
    encrypts every connection and admits only peers that hold the controller's public
    key, which travels in the 0600 connection files and nowhere else.
    """
    # clients and engines share the registration port, and one socket cannot bind a port on
    # 127.0.0.1 and on every interface: with engines on every interface, clients are too (CurveZMQ)
    client_ip = engine_ip if engine_ip in EVERY_INTERFACE else LOOPBACK
    args = [f"--IPController.engine_ip={engine_ip}", f"--IPController.client_ip={client_ip}",
            f"--IPController.monitor_ip={LOOPBACK}"]
    if not is_loopback(engine_ip):
        args.append("--IPController.enable_curve=True")  # the controller makes its key pair itself
    return args


# The hub's in-memory task database keeps every task's arguments and result (each carries a checkpoint):
# the master stores results itself, so the controller keeps none and its memory stays flat.
# The hub pings engines every 0.8 s and drops one after 4 missed pongs: a slave that vanished without a
# word (a spot instance taken back, a frozen machine) is noticed within 5 s, not ipyparallel's 33 s.
HEARTBEAT_MS = 800
CONTROLLER_ARGS = [
    "--IPController.db_class=NoDB",
    f"--HeartMonitor.period={HEARTBEAT_MS}",
    "--HeartMonitor.max_heartmonitor_misses=4",
]
# an engine checks for the hub's pings every period + 500 ms (ipyparallel's IPEngine.start_heartbeat)
ENGINE_CHECK_MS = HEARTBEAT_MS + 500


def grace_args(master_grace_minutes: float) -> list[str]:
    """How long an engine waits for a silent controller before it quits: ``[cluster] master_grace_minutes``.

    ipyparallel's engine gives up after 50 missed checks (about 65 s at our heartbeat): a laptop that
    sleeps longer would lose every remote engine.  With the grace, engines wait, and carry on when
    the controller answers again; past it they quit, so a master that never comes back does not keep
    slaves busy for ever.
    """
    misses = max(1, math.ceil(master_grace_minutes * 60_000 / ENGINE_CHECK_MS))
    return [f"--IPEngine.max_heartbeat_misses={misses}"]


# every engine (local: this checkout on its path; remote: the engines package uploaded by bootstrap) leaves
# at once when stopped, and begins importing torch as soon as it registered: engines/process/startup.py;
# __import__ leaves no name behind in the engine's namespace
ENGINE_STARTUP = "--IPEngine.startup_command=__import__('engines.process.startup').process.startup.install()"


def engine_args(master_grace_minutes: float) -> list[str]:
    """The arguments of every engine, local or remote.  Passed again by each start of a local engine set: a
    Cluster rebuilt from its file (``load_cluster``, as `scale` and the keeper do) has lost the config."""
    return grace_args(master_grace_minutes) + [ENGINE_STARTUP]


def new_cluster(profile: Path, cluster_id: str, *, engine_env: dict[str, str], engine_ip: str = LOOPBACK,
                engines: str | type = "local", engine_timeout: int = 120,
                master_grace_minutes: float = 10.0) -> ipp.Cluster:
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
        return ipp.Cluster.from_file(profile_dir=str(profile), cluster_id=cluster_id, log_level=logging.WARNING,
                                     load_profile=False)
    except FileNotFoundError:
        return None


def engine_set_pids(cluster: Optional[ipp.Cluster]) -> dict[int, str]:
    """Engine pid -> the id of the engine set that started it (local launchers only)."""
    if cluster is None:
        return {}
    return {launcher.pid: set_id for set_id, engine_set in cluster.engines.items()
            for launcher in getattr(engine_set, "launchers", {}).values() if getattr(launcher, "pid", None)}


def secure_files(profile: Path) -> None:
    """Connection and cluster files are 0600: the connection files carry the HMAC key."""
    security = Path(profile) / "security"
    if security.is_dir():
        os.chmod(security, 0o700)
        for path in security.iterdir():
            os.chmod(path, 0o600)


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
        super().__init__(f"the controller (pid {pid}) exited as it started: "
                         f"{' / '.join(lines[-3:]) if lines else 'it printed nothing'}")


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
            raise ProviderError(f"the controller (pid {pid}) wrote no engine connection file {path} within "
                                f"{timeout:.0f} s")
        time.sleep(poll_s)


def start_controller(cluster: ipp.Cluster, timeout: float, on_start: Callable[[Optional[int]], None] = lambda pid: None,
                     starts: int = CONTROLLER_STARTS) -> None:
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
            log.warning("the controller could not bind a port it had picked (%s; attempt %d of %d); starting "
                        "it again", PORT_TAKEN, attempt, starts)


def connect(url: Path, timeout: float = 10) -> ipp.Client:
    if not Path(url).is_file():
        raise FileNotFoundError(f"connection file {url} is missing: the controller is not running")
    # positional: ipyparallel 9 ignores the url_file= keyword and falls back to the default profile
    return ipp.Client(str(url), timeout=timeout)


def holds_task(queue: dict) -> bool:
    """Whether an engine's entry of ``Client.queue_status()`` shows a task running or queued on it."""
    return bool(queue.get("tasks") or queue.get("queue"))


def busy_engines(client: ipp.Client) -> set[int]:
    """The engines that run or hold a task now, as the controller sees them."""
    return {engine for engine, queue in client.queue_status().items()
            if isinstance(engine, int) and holds_task(queue)}


def idle_engines(client: ipp.Client) -> list[int]:
    """The engines registered with ``client`` that have nothing queued or running, as the controller sees now."""
    queues, registered = client.queue_status(), set(client.ids)
    return sorted(engine for engine, queue in queues.items() if engine in registered and not holds_task(queue))


def confirm_output(client: ipp.Client, targets: list[int], timeout: float) -> list[int]:
    """Make sure what each of ``targets`` prints and publishes reaches ``client``; return those unconfirmed.

    Engine output takes two ZeroMQ PUB/SUB links (engine to the controller's relay, relay to the client),
    and a PUB drops every message until the SUB's subscription has reached it. A client just connected, or
    an engine just registered, can therefore lose its first messages: among them the "idle" status that
    ``view.execute(block=True)`` and ``%px`` wait for with no timeout, so they hang for ever (1 in 50 new
    clients on an idle 2-core master, 4 in 100 on a loaded one). Nothing tells a SUB when it is subscribed,
    so each engine runs empty cells until one's status comes back; as each round sends a new cell, a request
    lost on its way (a ROUTER drops what it has no connected peer for) is made good too. Call it for idle
    engines only: a cell queues behind a running task. An engine that leaves meanwhile is neither confirmed
    nor returned.
    """
    confirmed, gone = _run_cells_until_output(client, targets, timeout, enough=len(targets))
    unconfirmed = sorted(set(targets) - confirmed - gone)
    if unconfirmed:
        log.warning("no output of engine(s) %s reached the master within %g s; what they print may be lost",
                    unconfirmed, timeout)
    return unconfirmed


def silence_report(client: ipp.Client, engines: list[int], timeout: float = 5.0) -> str:
    """What the controller says of ``engines`` that ``client`` hears nothing from: their queues as the hub
    counts them (work done there means replies were lost on the way), or that the hub does not answer this
    client either (then the client's own connection is what is broken)."""
    answer: dict = {}
    asking = threading.Thread(target=lambda: answer.update(queues=client.queue_status()), daemon=True)
    asking.start()
    asking.join(timeout)
    io_thread = getattr(client, "_io_thread", None)
    io = "" if io_thread is None or io_thread.is_alive() else "; the client's IO thread has ended"
    if "queues" not in answer:
        return f"the controller did not answer this client within {timeout:g} s either{io}"
    queues = answer["queues"]
    return "the controller counts " + "; ".join(
        f"engine {engine}: " + (", ".join(f"{key} {len(value) if isinstance(value, list) else value}"
                                          for key, value in sorted(queues[engine].items()))
                                if engine in queues else "not registered")
        for engine in engines) + io


def confirm_client_output(client: ipp.Client, timeout: float) -> bool:
    """Make sure a client just connected gets engine output: its own link to the relay is confirmed once any
    idle engine's empty cell reports back (each engine's link was confirmed when it joined, by
    ``confirm_output``). False if no engine is idle, or none reported within ``timeout``."""
    idle = idle_engines(client)[:4]  # one answer is enough; a few in case one is frozen
    confirmed, gone = _run_cells_until_output(client, idle, timeout, enough=1)
    if idle and not confirmed and set(idle) - gone:
        log.warning("no engine output reached this client within %g s; what engines print may be lost", timeout)
    return bool(confirmed)


def _run_cells_until_output(client: ipp.Client, targets: list[int], timeout: float,
                            enough: int) -> tuple[set[int], set[int]]:
    """Run empty cells on ``targets`` until ``enough`` of them have had a cell's output arrive, or ``timeout``
    is up. Returns (those confirmed, those that left the cluster meanwhile). A lost cell's output never
    comes, so each round sends a new cell and waits on it a little longer than the last."""
    deadline = time.monotonic() + timeout
    cells: dict[int, list] = {engine: [] for engine in targets}
    confirmed: set[int] = set()
    gone: set[int] = set()
    patience = 0.1
    while cells and len(confirmed) < enough and time.monotonic() < deadline:
        for engine in list(cells):
            try:
                cells[engine].append(client[engine].execute("", silent=True, block=False))
            except IndexError:  # unregistered since: ipyparallel has no such engine any more
                gone.add(engine)
                del cells[engine]
        for engine in list(cells):
            cells[engine][-1].wait_for_output(max(0.0, min(patience, deadline - time.monotonic())))
            if any(cell.wait_for_output(0) for cell in cells[engine]):
                confirmed.add(engine)
                del cells[engine]
                if len(confirmed) >= enough:
                    break
        patience = min(2 * patience, 2.0)
    return confirmed, gone

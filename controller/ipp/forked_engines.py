"""Local engines forked from a server that imported torch once, instead of each engine importing it.

ipyparallel's local launcher starts every engine as ``python -m ipyparallel.engine``, and each then
imports ipyparallel's engine, torch and our training code by itself: about 5 s of CPU an engine,
paid by every `cluster start` and `cluster scale` up, four at once on a 2-core master.  These
launchers ask the cluster's fork server (engines/process/forkserver.py) for the engine instead, and it
forks one with all of that in memory already.  Everything else is ipyparallel's: the launcher
records the engine's pid, waits for it to end, and stops it with SIGTERM then SIGKILL, as before.

One server per cluster, started by the first launcher that needs it, with the engines' environment
(the cluster's process marker among it: `cluster stop` ends it with the cluster's other processes).
When it cannot be reached the engine is started the plain way, and the log says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import psutil
from ipyparallel.cluster.launcher import LocalEngineLauncher, LocalEngineSetLauncher, ipengine_cmd_argv

from controller.ipp.profile import engine_file
from engines.process import forkserver

log = logging.getLogger(__name__)

# the server's imports take about 5 s on an idle machine; four engine starts at once on 2 cores, more
CONNECT_TIMEOUT = 120.0


# abstract Unix sockets and SO_PEERCRED are Linux's; elsewhere engines start the plain way
FORKING = sys.platform.startswith("linux")


class ForkServerUnavailable(RuntimeError):
    pass


def server_name(profile_dir: str, cluster_id: str, env: dict[str, str]) -> str:
    """One server per cluster and engine environment (threads, code path): engines forked from it share both.
    Not ipyparallel's own variables: the connection info among them exists only once the controller runs,
    and each engine gets them in its request."""
    own = sorted((key, value) for key, value in env.items() if not key.startswith("IPP_"))
    key = json.dumps([os.path.abspath(profile_dir), cluster_id, sys.executable, own])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _connect(name: str) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(forkserver.address(name))
    except OSError:
        connection.close()
        raise
    return connection


def server_log(profile_dir: str | Path, cluster_id: str) -> Path:
    return Path(profile_dir) / "log" / f"forkserver-{cluster_id}.log"


def _start_server(name: str, profile_dir: str | Path, cluster_id: str, env: dict[str, str], cwd: str) -> None:
    output = server_log(profile_dir, cluster_id)
    output.parent.mkdir(parents=True, exist_ok=True)
    # it leaves once the controller's engine connection file is gone (with no engine of its own left)
    command = [
        sys.executable,
        "-m",
        "engines.process.forkserver",
        name,
        "--controller-file",
        str(engine_file(Path(profile_dir), cluster_id)),
    ]
    with open(output, "ab") as log_file, open(os.devnull, "rb") as stdin:
        # a session of its own, as ipyparallel starts engines: a Ctrl-C at the master's terminal is not for it
        subprocess.Popen(
            command, stdin=stdin, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    os.chmod(output, 0o600)


def start_server(profile_dir: str | Path, cluster_id: str, environment: dict[str, str]) -> None:
    """Start the cluster's fork server now unless one runs, so that its imports overlap whatever the caller
    does next (the controller's start); engines launched with ``environment`` then come from it."""
    if not FORKING:
        return
    name = server_name(str(profile_dir), cluster_id, environment)
    try:
        _connect(name).close()
    except OSError:
        _start_server(name, profile_dir, cluster_id, {**os.environ, **environment}, os.getcwd())


def fork_engine(
    name: str,
    profile_dir: str,
    cluster_id: str,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    output: str,
    timeout: float = CONNECT_TIMEOUT,
) -> int:
    """The pid of a new engine forked by server ``name`` (started first when none answers)."""
    log_file = server_log(profile_dir, cluster_id)
    try:
        connection = _connect(name)
    except OSError:
        _start_server(name, profile_dir, cluster_id, env, cwd)
        deadline = time.monotonic() + 10
        while True:
            try:
                connection = _connect(name)
                break
            except OSError as error:
                if time.monotonic() > deadline:
                    raise ForkServerUnavailable(f"the fork server did not start (see {log_file}): {error}") from None
                time.sleep(0.02)
    with connection:
        connection.settimeout(timeout)
        request = {"argv": argv, "env": env, "cwd": cwd, "output": output}
        try:
            connection.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(forkserver.read_line(connection) or b"{}")
        except (OSError, ValueError) as error:
            raise ForkServerUnavailable(f"the fork server did not answer (see {log_file}): {error}") from None
    if "pid" not in reply:
        raise ForkServerUnavailable(f"the fork server refused: {reply.get('error', 'no answer')}")
    return int(reply["pid"])


class ForkedEngineLauncher(LocalEngineLauncher):
    """ipyparallel's local engine launcher, with the process forked by the fork server."""

    def start(self):
        args = self.args
        if not FORKING or args[: len(ipengine_cmd_argv)] != ipengine_cmd_argv:
            return super().start()  # a configured engine command is not ours to replace
        env = {**os.environ, **self.get_env()}
        name = server_name(self.profile_dir, self.cluster_id, self.environment)
        try:
            pid = fork_engine(
                name,
                self.profile_dir,
                self.cluster_id,
                args[len(ipengine_cmd_argv) :],
                env,
                os.path.abspath(self.work_dir),
                self.output_file,
            )
        except (ForkServerUnavailable, OSError) as error:
            log.warning("engine %s starts without the fork server: %s", self.identifier, error)
            return super().start()
        self.pid = pid
        self.process = psutil.Process(pid)
        self.notify_start(pid)
        self._start_waiting()
        return pid


class ForkedEngineSetLauncher(LocalEngineSetLauncher):
    """ipyparallel's local engine set, each engine from the fork server."""

    launcher_class = ForkedEngineLauncher
    # what ipyparallel writes into the cluster file for this class: a dotted path it can import back
    entrypoint_name = f"{__name__}.ForkedEngineSetLauncher"


def server_pids(profile_dir: Path, cluster_id: Optional[str] = None) -> list[int]:
    """The fork servers of a profile (and cluster): processes running engines.process.forkserver, less the engines
    forked from one, which show the same command line (a fork does not exec)."""
    from controller.ipp import processes

    def is_server(pid: int) -> bool:
        try:
            return "engines.process.forkserver" in " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            return False

    marked = processes.marked_processes(Path(profile_dir), cluster_id)
    found = []
    for pid in marked:
        try:
            parent = psutil.Process(pid).ppid()
        except psutil.Error:
            continue
        if is_server(pid) and not is_server(parent):
            found.append(pid)
    return found

"""SSH reverse tunnels from slaves to the controller, held by a small process on the master.

When the master is outside the slaves' network (a laptop behind NAT), engines
cannot open connections to the controller.  The master then opens an SSH
connection to every slave and asks its sshd to listen on 127.0.0.1 for each
of the controller's engine ports (``Transport.request_port_forward``); every
connection an engine makes there comes back through SSH to the controller on
the master's loopback.  The controller itself then listens on loopback only.

The slave's port for each forward is one its sshd picks free (port 0), not the
controller's number: that number can be taken on the slave, by a connection's
local port (an old engine's, or one in TIME_WAIT for a minute after it ended),
and a listener cannot bind it then.  The holder writes the ports it got into
its ready file, and each slave's engine connection file names them.  After a
reconnect it asks for the same ports again: the engines there know only those.

The tunnels must outlive ``cluster start`` (a CLI process), so they are held by
``python -m controller.providers.remote.tunnels SPEC``, started in its own session; ``stop``
kills it by its pid.  The spec file names hosts, key files and ports, never
the HMAC key.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import paramiko

from controller.errors import ProviderError
from controller.ipp.processes import PROCESS_MARKER, is_marked, kill_process_group, process_marker
from controller.ipp.profile import REPO_ROOT
from controller.providers.base import SshTarget
from controller.providers.remote.transport import SshConnection

log = logging.getLogger(__name__)

ROUND_SECONDS = 2.0  # how often the holder checks its sessions


@dataclass
class TunnelSpec:
    hosts: list[dict]  # Host fields
    known_hosts: str
    ports: list[int]  # the controller's engine ports; each slave gets a port of its own for each
    target: str = "127.0.0.1"  # where the controller listens on the master
    ready_file: str = ""
    probe_seconds: float = 15.0  # how often each session must prove it still carries traffic
    probe_timeout: float = 20.0  # no reply within this: the session is dead, reconnect

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))
        path.chmod(0o600)

    @classmethod
    def load(cls, path: Path) -> "TunnelSpec":
        return cls(**json.loads(Path(path).read_text()))


def _pump(channel, sock: socket.socket) -> None:
    """Copy bytes both ways between an SSH channel and a local socket until either closes."""
    try:
        while True:
            readable, _, _ = select.select([sock, channel], [], [], 30)
            if sock in readable:
                data = sock.recv(65536)
                if not data:
                    break
                channel.sendall(data)
            if channel in readable:
                data = channel.recv(65536)
                if not data:
                    break
                sock.sendall(data)
    except (OSError, EOFError):
        pass
    finally:
        channel.close()
        sock.close()


def _forward_handler(target: str, slave_ports: dict[int, int]):
    """Connections to a slave port go to the controller port it was asked for (``slave_ports``: controller
    port -> slave port, as the holder keeps it)."""

    def handler(channel, origin, server) -> None:
        # dict(): one copy made under the GIL, as the holder may add a port meanwhile from its own thread
        port = {theirs: ours for ours, theirs in dict(slave_ports).items()}.get(server[1])
        if port is None:  # a forward of an earlier request that this holder no longer serves
            channel.close()
            return
        try:
            sock = socket.create_connection((target, port), timeout=10)
        except OSError as error:
            log.warning("tunnel: controller port %s unreachable: %s", port, error)
            channel.close()
            return
        threading.Thread(target=_pump, args=(channel, sock), daemon=True).start()

    return handler


def answers(transport, timeout: float) -> bool:
    """Does the slave's sshd still answer on this session? (a keepalive request that wants a reply)

    After a laptop sleep or a NAT timeout a session can look open and carry nothing: only a
    reply proves it works.  The request runs in a thread because paramiko waits for it without
    a time limit.
    """
    replies: list[object] = []
    asking = threading.Thread(
        target=lambda: replies.append(transport.global_request("keepalive@openssh.com", wait=True)), daemon=True
    )
    asking.start()
    asking.join(timeout)
    # OpenSSH refuses the unknown request: a refusal (None) is an answer too, a dead session is not
    return not asking.is_alive() and transport.is_active()


class Holder:
    """The reverse forwards of one slave: (re)connect, (re)request every port, probe the session."""

    def __init__(self, host: SshTarget, spec: TunnelSpec):
        self.host = host
        self.spec = spec
        self.remote: Optional[SshConnection] = None
        self.forwarded: set[int] = set()  # controller ports forwarded on the current session
        self.slave_ports: dict[int, int] = {}  # controller port -> the slave's port for it, kept across sessions
        self.probed = 0.0

    @property
    def complete(self) -> bool:
        return self.remote is not None and self.forwarded == set(self.spec.ports)

    def keep_up(self) -> None:
        """One round: reconnect a dead session, ask again for the ports not forwarded yet."""
        transport = self.remote.client.get_transport() if self.remote else None
        if transport is not None and transport.is_active() and time.monotonic() - self.probed > self.spec.probe_seconds:
            self.probed = time.monotonic()
            if not answers(transport, self.spec.probe_timeout):
                log.warning("tunnel to %s: no answer within %.0f s; reconnecting", self.host, self.spec.probe_timeout)
                transport.close()
        if transport is None or not transport.is_active():
            if self.remote is not None:
                self.remote.close()
                log.warning("tunnel to %s dropped; reconnecting", self.host)
            self.remote, self.forwarded = None, set()
            self.remote = SshConnection.connect(self.host, Path(self.spec.known_hosts), timeout=60, record_new=False)
            self.probed = time.monotonic()
            transport = self.remote.client.get_transport()
        missing = sorted(set(self.spec.ports) - self.forwarded)
        for port in missing:
            asked = self.slave_ports.get(port, 0)
            try:
                bound = transport.request_port_forward(
                    "127.0.0.1", asked, handler=_forward_handler(self.spec.target, self.slave_ports)
                )
            except paramiko.SSHException as error:
                if asked:
                    # the slave's sshd may still hold the old session's forward until it notices that session
                    # is dead (ClientAliveInterval, TCP timeouts): ask again next round until it lets go
                    log.warning(
                        "tunnel to %s: port %d (controller port %d) still held on the slave (%s); retrying",
                        self.host,
                        asked,
                        port,
                        error,
                    )
                else:
                    log.warning(
                        "tunnel to %s: the slave's sshd refused to forward a port (%s; is "
                        "AllowTcpForwarding on there?); retrying",
                        self.host,
                        error,
                    )
                continue
            self.slave_ports[port] = bound
            self.forwarded.add(port)
        if missing and self.complete:
            log.info("tunnel to %s: %d ports forwarded", self.host, len(self.forwarded))

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()


def hold(spec: TunnelSpec, stop: Optional[threading.Event] = None) -> None:
    """Open the reverse forwards on every host and keep them up (reconnecting) until ``stop``."""
    stop = stop or threading.Event()
    holders = [Holder(SshTarget(**h), spec) for h in spec.hosts]
    ready = False
    try:
        while True:
            for holder in holders:
                try:
                    holder.keep_up()
                except ProviderError as error:  # the slave may be gone for good; keep the others up
                    if not ready:
                        raise
                    log.warning("%s", error)
            if not ready and all(h.complete for h in holders):
                ready = True
                if spec.ready_file:
                    _write_ready(Path(spec.ready_file), [h.slave_ports for h in holders])
            if stop.wait(ROUND_SECONDS if ready else 0.5):
                break
            if ready and spec.ready_file and not Path(spec.ready_file).exists():
                break  # the state directory was removed or stop ran: nobody needs these tunnels
    finally:
        for holder in holders:
            holder.close()


def _write_ready(path: Path, slave_ports: list[dict[int, int]]) -> None:
    """Whole or not at all (``spawn`` reads it as soon as it exists): the pid, and each host's ports."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(
        json.dumps({"pid": os.getpid(), "ports": [{str(k): v for k, v in ports.items()} for ports in slave_ports]})
    )
    partial.replace(path)


def slave_ports(ready_file: Path) -> list[dict[int, int]]:
    """From a holder's ready file: for each host of its spec, in order, controller port -> the slave's port."""
    return [{int(k): v for k, v in ports.items()} for ports in json.loads(Path(ready_file).read_text())["ports"]]


def spawn(
    spec: TunnelSpec, folder: Path, timeout: float = 60, profile: Optional[Path] = None, cluster_id: str = ""
) -> tuple[int, list[dict[int, int]]]:
    """Start the holder process; once every forward is up, returns its pid and, for each host of ``spec``
    in order, the slave's port for each controller port (or raises).

    It carries the cluster's process marker (``profile`` and ``cluster_id``) from its
    first instruction, like the controller and the engines: the clean-up that sweeps a
    cluster's local processes finds it even when the master was killed before it could
    write the pid file.
    """
    marker = process_marker(profile, cluster_id) if profile else {PROCESS_MARKER: ""}
    env = {**os.environ, **marker}
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "tunnels.json"
    ready = folder / "tunnels.ready"
    ready.unlink(missing_ok=True)
    spec.ready_file = str(ready)
    spec.save(spec_path)
    log_file = open(folder / "tunnels.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "controller.providers.remote.tunnels", str(spec_path)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=str(REPO_ROOT),
        env=env,
    )
    log_file.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists():
            return process.pid, slave_ports(ready)
        if process.poll() is not None:
            tail = (folder / "tunnels.log").read_text(errors="replace")[-1500:]
            raise ProviderError(f"the SSH tunnel process exited ({process.returncode}): {tail}")
        time.sleep(0.1)
    kill(process.pid)
    raise ProviderError(f"SSH tunnels not up within {timeout:.0f} s; see {folder / 'tunnels.log'}")


def kill(pid: Optional[int]) -> None:
    """End a tunnel holder, if that pid is still one of ours (a stale pid file may name anything)."""
    if pid and is_marked(pid):
        kill_process_group(pid)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    hold(TunnelSpec.load(Path(argv[0])), stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

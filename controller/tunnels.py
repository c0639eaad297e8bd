"""SSH reverse tunnels from slaves to the controller, held by a small process on the master.

When the master is outside the slaves' network (a laptop behind NAT), engines
cannot open connections to the controller.  The master then opens an SSH
connection to every slave and asks its sshd to listen on 127.0.0.1 for each
of the controller's engine ports (``Transport.request_port_forward``); every
connection an engine makes there comes back through SSH to the controller on
the master's loopback.  The controller itself then listens on loopback only.

The tunnels must outlive ``cluster start`` (a CLI process), so they are held by
``python -m controller.tunnels SPEC``, started in its own session; ``stop``
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

from .errors import ProviderError
from .processes import PROCESS_MARKER, is_marked, kill_process_group, process_marker
from .remote import Host, Remote

log = logging.getLogger(__name__)


@dataclass
class TunnelSpec:
    hosts: list[dict]  # Host fields
    known_hosts: str
    ports: list[int]  # the controller's engine ports, forwarded 1:1
    target: str = "127.0.0.1"  # where the controller listens on the master
    ready_file: str = ""

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


def _forward_handler(target: str):
    def handler(channel, origin, server) -> None:
        port = server[1]
        try:
            sock = socket.create_connection((target, port), timeout=10)
        except OSError as error:
            log.warning("tunnel: controller port %s unreachable: %s", port, error)
            channel.close()
            return
        threading.Thread(target=_pump, args=(channel, sock), daemon=True).start()
    return handler


def hold(spec: TunnelSpec, stop: Optional[threading.Event] = None) -> None:
    """Open the reverse forwards on every host and keep them up (reconnecting) until ``stop``."""
    stop = stop or threading.Event()
    remotes: dict[int, Remote] = {}

    def ensure(index: int, host: Host) -> None:
        remote = remotes.get(index)
        transport = remote.client.get_transport() if remote else None
        if transport is not None and transport.is_active():
            return
        if remote is not None:
            remote.close()
            log.warning("tunnel to %s dropped; reconnecting", host)
        remote = Remote.connect(host, Path(spec.known_hosts), timeout=60, record_new=False)
        transport = remote.client.get_transport()
        for port in spec.ports:
            transport.request_port_forward("127.0.0.1", port, handler=_forward_handler(spec.target))
        remotes[index] = remote
        log.info("tunnel to %s: %d ports forwarded", host, len(spec.ports))

    hosts = [Host(**h) for h in spec.hosts]
    for index, host in enumerate(hosts):
        ensure(index, host)
    if spec.ready_file:
        Path(spec.ready_file).write_text(str(os.getpid()))
    while not stop.wait(2.0):
        if spec.ready_file and not Path(spec.ready_file).exists():
            break  # the state directory was removed or stop ran: nobody needs these tunnels
        for index, host in enumerate(hosts):
            try:
                ensure(index, host)
            except ProviderError as error:  # the slave may be gone for good; keep the others up
                log.warning("%s", error)
    for remote in remotes.values():
        remote.close()


def spawn(spec: TunnelSpec, folder: Path, timeout: float = 60, profile: Optional[Path] = None,
          cluster_id: str = "") -> int:
    """Start the holder process; returns its pid once every forward is up (or raises).

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
    process = subprocess.Popen([sys.executable, "-m", "controller.tunnels", str(spec_path)],
                               stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent), env=env)
    log_file.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists():
            return process.pid
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

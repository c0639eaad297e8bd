"""A master that goes away for a while: a sleeping laptop, an SSH session that dies under the tunnels.

Slaves are network-namespace hosts with real sshd (tests/netns.py); the controller, the tunnel
holder and the engines are real processes.  Every fault is played at a chosen point and the test
waits for a condition (a line in an engine's log, a line in the holder's log), never for a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

from controller.api import Cluster
from controller.ipp import processes
from controller.ipp.profile import ENGINE_CHECK_MS
from controller.providers.base import SshTarget
from controller.providers.remote import tunnels
from controller.providers.remote.transport import SshConnection
from tests.helpers import engines_holding_tasks, make_config, wait_until
from tests.netns import SLAVE_USER, NetnsHosts, client_key, unavailable

REASON = unavailable()
pytestmark = [pytest.mark.slow]
needs_netns = pytest.mark.skipif(bool(REASON), reason=REASON or "ok")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with NetnsHosts(1, tmp_path_factory.mktemp("netns"), first_subnet=45) as made:
        made.key = client_key(made.workdir)
        made.hosts[0].authorize(made.key)
        yield made


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def signal_group(pid: int, sig: signal.Signals) -> None:
    os.killpg(os.getpgid(pid), sig)


@needs_netns
def test_remote_engines_outlast_a_sleeping_master_and_take_work_when_it_wakes(tmp_path, tiny_data_dir, hosts):
    """The laptop sleeps: controller and tunnel holder frozen (SIGSTOP) until the engine has missed the
    hub's pings for longer than the hub's own drop time; then they wake. The engine waited (its grace),
    is still registered, and trains."""
    host = hosts.hosts[0]
    config = make_config(
        tmp_path,
        tiny_data_dir,
        slaves=1,
        extra=f"""
master_grace_minutes = 1
provider = ssh

[ssh]
hosts = {host.address}
user = {SLAVE_USER}
key_file = {hosts.key}
python = {sys.executable}
tunnel = always
""",
    )
    cluster = Cluster(config)
    try:
        cluster.start()
        (engine,) = [p for p in host.engine_processes() if b"nanny" not in cmdline(p)]
        misses = -(-60_000 // ENGINE_CHECK_MS)  # one minute of checks
        assert f"--IPEngine.max_heartbeat_misses={misses}".encode() in cmdline(engine)
        tag = f"test.{socket.gethostname()}"
        log = host.dir / "home" / ".cluster-engine" / "run" / tag / "engine-0.log"
        controller = cluster.store.clusters.active("test").controller_pid
        holder = int((config.state_dir / "tunnels" / tag / "tunnels.pid").read_text())

        for pid in (controller, holder):
            signal_group(pid, signal.SIGSTOP)
        try:
            # 5 checks of 1.3 s missed: away longer than the hub takes to drop an engine (4 pings of 0.8 s)
            assert wait_until(lambda: "(5 time(s) in a row)" in log.read_text(), timeout=120), log.read_text()
        finally:
            for pid in (controller, holder):
                signal_group(pid, signal.SIGCONT)

        assert processes.pid_alive(engine)  # waited out the master instead of quitting
        assert wait_until(lambda: cluster.status().state == "running", timeout=30), cluster.status()
        run = cluster.train(subset=200, epochs=1)
        assert run.run.state == "completed" and run.run.host == host.hostname
        assert "shutting down" not in log.read_text()
    finally:
        cluster.stop()
        cluster.close()


ECHO_THROUGH_SLAVE = """
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as s:
    s.sendall(b"ping")
    print(s.recv(4).decode())
"""


def through_slave(host, port: int) -> bool:
    """A connection made on the slave to its end of the reverse forward reaches the master's server."""
    try:
        result = subprocess.run(
            ["ip", "netns", "exec", host.ns, sys.executable, "-c", ECHO_THROUGH_SLAVE, str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.stdout.strip() == "ping"


def ssh_sessions(host) -> list[int]:
    """The slave's sshd processes serving a login (not the listening daemon)."""
    return [p for p in host.processes() if cmdline(p).startswith(b"sshd: ") and SLAVE_USER.encode() in cmdline(p)]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)


@contextlib.contextmanager
def echo_server():
    """The "controller" on the master's loopback: echoes what comes through the tunnel. Yields its port."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)

        def echo() -> None:
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:
                    return
                with connection:
                    connection.sendall(connection.recv(4))

        threading.Thread(target=echo, daemon=True).start()
        yield server.getsockname()[1]


# on the slave: a connection whose local port is argv[1] (as an engine's may be), held until stdin closes
CONNECTION_FROM_PORT = """
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
client = socket.socket()
client.bind(("127.0.0.1", int(sys.argv[1])))
client.connect(listener.getsockname())
print("held", flush=True)
sys.stdin.read()
"""


@needs_netns
def test_a_controller_port_taken_on_the_slave_by_a_connection_is_forwarded_from_a_free_one(tmp_path, hosts):
    """A listener cannot bind a port that a connection uses as its local port (an old engine's, or one in
    TIME_WAIT for a minute after), so the slave's end of each forward is a port its sshd picks free, and
    the holder says which: asking for the controller's own number there once failed a start for 60 s."""
    host = hosts.hosts[0]
    slave = SshTarget(host.address, 22, SLAVE_USER, str(hosts.key))
    known_hosts = tmp_path / "known_hosts"
    SshConnection.connect(slave, known_hosts, timeout=20).close()  # records the host key, as start does
    with echo_server() as port:
        taken = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, sys.executable, "-c", CONNECTION_FROM_PORT, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        stop = threading.Event()
        ready = tmp_path / "ready"
        holder = threading.Thread(
            target=tunnels.hold,
            args=(
                tunnels.TunnelSpec(
                    hosts=[asdict(slave)], known_hosts=str(known_hosts), ports=[port], ready_file=str(ready)
                ),
                stop,
            ),
            daemon=True,
        )
        try:
            assert taken.stdout.readline() == "held\n"
            holder.start()
            assert wait_until(ready.exists, timeout=60)
            slave_port = tunnels.slave_ports(ready)[0][port]
            assert slave_port != port
            assert through_slave(host, slave_port)
        finally:
            stop.set()
            taken.kill()
            taken.wait()
            holder.join(timeout=30)
        assert not holder.is_alive()


@needs_netns
def test_the_tunnel_holder_reconnects_and_waits_for_the_forward_the_slave_still_holds(tmp_path, hosts):
    """The session under the tunnels stops answering (the slave's sshd process for it is frozen, as a
    session lost in a laptop sleep looks); the holder gives up on it, reconnects, finds the port still
    held by the old session, asks again until the slave lets go, and the forward carries traffic again."""
    host = hosts.hosts[0]
    slave = SshTarget(host.address, 22, SLAVE_USER, str(hosts.key))
    known_hosts = tmp_path / "known_hosts"
    SshConnection.connect(slave, known_hosts, timeout=20).close()  # records the host key, as start does

    with echo_server() as port:
        ready = tmp_path / "ready"
        spec = tunnels.TunnelSpec(
            hosts=[asdict(slave)],
            known_hosts=str(known_hosts),
            ports=[port],
            ready_file=str(ready),
            probe_seconds=1,
            probe_timeout=2,
        )
        lines = Lines()
        logging.getLogger(tunnels.__name__).addHandler(lines)
        stop = threading.Event()
        holder = threading.Thread(target=tunnels.hold, args=(spec, stop), daemon=True)
        old: list[int] = []
        try:
            holder.start()
            assert wait_until(ready.exists, timeout=60)
            slave_port = tunnels.slave_ports(ready)[0][port]  # a port the slave's sshd picked free
            assert wait_until(lambda: through_slave(host, slave_port), timeout=30)

            old = ssh_sessions(host)
            assert old
            for pid in old:
                os.kill(pid, signal.SIGSTOP)  # the session is silent; its listening port stays taken
            assert wait_until(lambda: lines.saw("no answer within"), timeout=60), lines.lines
            # the engines there know only that port: the new session asks for it again
            assert wait_until(
                lambda: lines.saw(f"port {slave_port} (controller port {port}) still held"), timeout=60
            ), lines.lines

            for pid in old:  # the slave's sshd gives up on the old session at last
                os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda: through_slave(host, slave_port), timeout=60), lines.lines
            assert holder.is_alive()
        finally:
            stop.set()
            for pid in old:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            holder.join(timeout=30)
            logging.getLogger(tunnels.__name__).removeHandler(lines)
        assert not holder.is_alive()


def test_after_the_controller_died_status_says_what_to_do_and_start_adopts_and_resume_finishes_the_run(
    tmp_path, tiny_data_dir
):
    """The master's controller died mid-run (its engine lives on, waiting out its grace). Status names the way
    on; `cluster start` gives the same cluster a new controller and a fresh local engine (the old one ends:
    a local engine is not worth keeping), and the run resumes from its checkpoint."""
    import io

    from controller.cli import main

    config = make_config(tmp_path, tiny_data_dir, slaves=1)
    cluster = Cluster(config)
    try:
        first = cluster.start()
        (old_engine,) = [e.pid for e in first.engines]
        with engines_holding_tasks(cluster.client, tmp_path, when="checkpoint is not None") as held:
            train = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "controller",
                    "--config",
                    str(config.source),
                    "train",
                    "--epochs",
                    "3",
                    "--subset",
                    "200",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                assert held.wait(process=train), "the run never reached its second task"
                signal_group(cluster.store.clusters.active("test").controller_pid, signal.SIGKILL)
                _, err = train.communicate(timeout=90)
            finally:
                train.kill()
        assert train.returncode == 3, err
        (run,) = cluster.store.runs.all(limit=1)
        assert run.state == "interrupted" and run.epochs_done == 1
        assert processes.pid_alive(old_engine)  # in its grace, waiting for a controller that is gone

        out = io.StringIO()
        assert main(["--config", str(config.source), "status"], stdout=out, stderr=io.StringIO()) == 0
        assert "failed" in out.getvalue() and "the controller is gone" in out.getvalue()
        assert (
            f"run `cluster start` (it starts the engines again for this cluster), then `cluster train --resume "
            f"{run.id}`" in out.getvalue().replace("\n", " ")
        ), out.getvalue()

        status = cluster.start()
        assert status.cluster_id == first.cluster_id and [e.state for e in status.engines] == ["idle"]
        assert wait_until(lambda: not processes.pid_alive(old_engine), timeout=10)
        resumed = cluster.resume(run.id)
        assert resumed.run.state == "completed" and resumed.run.epochs_done == 3
        assert [e.epoch for e in resumed.epochs] == [1, 2, 3]
    finally:
        cluster.stop()
        cluster.close()

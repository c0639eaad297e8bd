"""Exposure checks on real parts: what listens where after a start, who can read the files, what the logs say.

Every provider starts for real (local engines; sshd in network namespaces for ssh; moto's EC2 server and
namespace hosts for aws), then the test looks at the controller's listening sockets with psutil, at the
modes of state_dir, keys and connection files, and at everything the CLI wrote at each verbosity.
"""
from __future__ import annotations

import io
import json
import logging
import stat
import sys
from pathlib import Path

import psutil
import pytest
import zmq

from controller import ipcluster
from controller.api import Cluster
from controller.cli import main
from controller.errors import ProviderError
from controller.providers import aws
from tests.conftest import cluster_pids, make_config, running_cluster
from tests.netns import SLAVE_USER, NetnsHosts, client_key, unavailable
from tests.test_aws_provider import NOTHING, aws_config, ec2, image, mapped, moto_url, tagged  # noqa: F401 - fixtures

NETNS = unavailable()
needs_netns = pytest.mark.skipif(bool(NETNS), reason=NETNS or "ok")
WILDCARD = {"0.0.0.0", "::", ""}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two namespace slaves with their own sshd (subnets 21, 22: apart from the other modules')."""
    if NETNS:
        pytest.skip(NETNS)
    with NetnsHosts(2, tmp_path_factory.mktemp("netns"), first_subnet=21) as made:
        made.key = client_key(made.workdir)
        for host in made.hosts:
            host.authorize(made.key)
        yield made


def listening(state_dir: Path) -> dict[int, set[str]]:
    """Port -> addresses of every TCP socket that the cluster's local processes listen on."""
    pids = set(cluster_pids(state_dir))
    found: dict[int, set[str]] = {}
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            found.setdefault(c.laddr.port, set()).add(c.laddr.ip)
    return found


def addresses(sockets: dict[int, set[str]], ports=None) -> set[str]:
    return {ip for port, ips in sockets.items() if ports is None or port in ports for ip in ips}


def ports_of(connection: dict) -> set[int]:
    ports = set()
    for key, value in connection.items():
        if key in ("registration", "control", "mux", "task", "iopub", "notification", "hb_ping", "hb_pong",
                   "broadcast"):
            ports.update(value if isinstance(value, list) else [value])
    return ports


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_private_files(state_dir: Path) -> None:
    """state_dir and the profile 0700; connection files (HMAC or CurveZMQ key) 0600 in a 0700 folder."""
    assert mode(state_dir) == 0o700
    security = ipcluster.profile_dir(state_dir) / "security"
    assert mode(ipcluster.profile_dir(state_dir)) == 0o700 and mode(security) == 0o700
    files = list(security.glob("*.json"))
    assert any(f.name.endswith("-client.json") for f in files) and any(f.name.endswith("-engine.json") for f in files)
    assert all(mode(f) == 0o600 for f in files), {f.name: oct(mode(f)) for f in files}


def test_local_cluster_listens_on_loopback_only_and_keeps_its_files_private(tmp_path, tiny_data_dir):
    with running_cluster(tmp_path, tiny_data_dir) as cluster:
        sockets = listening(cluster.config.state_dir)
        assert sockets and addresses(sockets) == {"127.0.0.1"}, sockets
        assert_private_files(cluster.config.state_dir)
        engine = json.loads(ipcluster.engine_file(ipcluster.profile_dir(cluster.config.state_dir),
                                                 cluster.store.clusters.active("test").ipp_cluster_id).read_text())
        assert not engine.get("curve_serverkey")  # loopback only: the HMAC key signs every message


def ssh_config(tmp_path, data_dir, hosts, tunnel: str, slaves: int = 1):
    for host in hosts.hosts[:slaves]:
        host.authorized_keys.write_text("")  # the aws tests of this module authorise their own keys
        host.authorize(hosts.key)
    return make_config(tmp_path, data_dir, slaves=slaves, extra=f"""
provider = ssh

[ssh]
hosts = {", ".join(h.address for h in hosts.hosts[:slaves])}
user = {SLAVE_USER}
key_file = {hosts.key}
python = {sys.executable}
tunnel = {tunnel}
""")


def registration_reply(url: str, connection: dict, curve: bool, timeout_ms: int) -> bool:
    """A raw ZeroMQ client asks the controller's registration port for its connection info.

    It signs with the connection file's HMAC key; with ``curve`` it also knows the controller's
    CurveZMQ public key (as ipyparallel.Client does when it reads the file).  True if any reply came.
    """
    from jupyter_client.session import Session

    session = Session(key=connection["key"].encode(), signature_scheme=connection["signature_scheme"],
                      packer=connection["pack"], unpacker=connection["unpack"])
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    try:
        if curve:
            sock.curve_serverkey = connection["curve_serverkey"].encode()
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        # a DEALER's send blocks while it has no ready peer, which is for ever when the handshake is
        # refused (no CurveZMQ key): bounded, a send that cannot go counts as no reply
        sock.sndtimeo = timeout_ms
        sock.connect(url)
        try:
            session.send(sock, "connection_request")
        except zmq.Again:
            return False
        return bool(sock.poll(timeout_ms, zmq.POLLIN))
    finally:
        sock.close()
        context.term()


@needs_netns
@pytest.mark.slow
@pytest.mark.parametrize("tunnel", ["never", "always"])
def test_ssh_client_ports_on_loopback_engine_ports_only_toward_the_slaves(tunnel, tmp_path, tiny_data_dir, hosts):
    """Direct engines: engine ports on the master's address that reaches the slave, CurveZMQ on, client and
    monitor ports on loopback. Tunnels: everything on loopback."""
    cluster = Cluster(ssh_config(tmp_path, tiny_data_dir, hosts, tunnel))
    try:
        status = cluster.start()
        assert [e.host for e in status.engines] == ["slave21"]  # registered (through CurveZMQ when direct)
        record = cluster.store.clusters.active("test")
        profile = ipcluster.profile_dir(cluster.config.state_dir)
        client = json.loads(ipcluster.url_file(profile, record.ipp_cluster_id).read_text())
        engine = json.loads(ipcluster.engine_file(profile, record.ipp_cluster_id).read_text())
        sockets = listening(cluster.config.state_dir)
        assert not WILDCARD & addresses(sockets), sockets  # nothing on every interface
        toward_slave = "127.0.0.1" if tunnel == "always" else hosts.hosts[0].master_address
        # one port is both: registration, where clients and engines alike say hello
        assert client["registration"] == engine["registration"]
        assert addresses(sockets, ports_of(client) - {client["registration"]}) == {"127.0.0.1"}
        assert addresses(sockets, ports_of(engine) - {engine["registration"]}) == {toward_slave}
        assert sockets[client["registration"]] == {"127.0.0.1", toward_slave}
        assert addresses(sockets) == {"127.0.0.1", toward_slave}  # the monitor and schedulers: loopback
        assert_private_files(cluster.config.state_dir)
        if tunnel == "never":
            assert_only_curve_clients_are_answered(engine, hosts.hosts[0], toward_slave)
        else:
            assert not engine.get("curve_serverkey")
        assert cluster.train(subset=100, epochs=1).run.state == "completed"
    finally:
        cluster.stop()
        cluster.close()


def assert_only_curve_clients_are_answered(engine: dict, host, address: str) -> None:
    remote = json.loads(next((host.dir / "home").glob(".cluster-engine/run/*/engine.json")).read_text())
    assert engine["curve_serverkey"] and remote["curve_serverkey"] == engine["curve_serverkey"]
    url = f"tcp://{address}:{engine['registration']}"
    # the same request with the controller's public key is answered: the port and the message are right
    assert registration_reply(url, engine, curve=True, timeout_ms=60_000)
    # without it (the connection file's other contents are not enough) nothing comes back: the
    # CurveZMQ handshake fails, so the request never reaches the controller (the wait only bounds it)
    assert not registration_reply(url, engine, curve=False, timeout_ms=3000)


@needs_netns
@pytest.mark.slow
def test_ssh_slaves_behind_two_interfaces_get_every_interface_with_curve_only(tmp_path, tiny_data_dir, hosts):
    """One address cannot reach both slaves: the controller listens on every interface, never without CurveZMQ."""
    cluster = Cluster(ssh_config(tmp_path, tiny_data_dir, hosts, "never", slaves=2))
    try:
        status = cluster.start()
        assert sorted(e.host for e in status.engines) == ["slave21", "slave22"]
        record = cluster.store.clusters.active("test")
        profile = ipcluster.profile_dir(cluster.config.state_dir)
        client = json.loads(ipcluster.url_file(profile, record.ipp_cluster_id).read_text())
        engine = json.loads(ipcluster.engine_file(profile, record.ipp_cluster_id).read_text())
        sockets = listening(cluster.config.state_dir)
        assert addresses(sockets, ports_of(engine) | ports_of(client)) == {"0.0.0.0"}
        assert addresses(sockets) == {"0.0.0.0", "127.0.0.1"}  # the monitor and schedulers: loopback
        for host in hosts.hosts:
            assert_only_curve_clients_are_answered(engine, host, host.master_address)
    finally:
        cluster.stop()
        cluster.close()


def run_cli(*argv: str) -> tuple[int, str]:
    """The CLI in-process with a bare root logger, as a fresh `cluster` process has it: stdout + stderr."""
    root = logging.getLogger()
    saved = [(logger, logger.level, logger.handlers[:]) for logger in
             (root, logging.getLogger("controller"), logging.getLogger("engines"))]
    root.handlers = []  # pytest's capture handlers are put back below
    out, err = io.StringIO(), io.StringIO()
    try:
        code = main(list(argv), stdout=out, stderr=err)
    finally:
        for logger, level, handlers in saved:
            logger.setLevel(level)
            logger.handlers = handlers
    return code, out.getvalue() + err.getvalue()


@pytest.fixture
def captured_key(monkeypatch) -> list[str]:
    """The private key each start creates, read from its 0600 file (to look for it in the output)."""
    seen: list[str] = []
    original = aws.AwsProvider.key_pair

    def key_pair(self, ec2):
        name, path = original(self, ec2)
        seen.append(Path(path).read_text())
        return name, path

    monkeypatch.setattr(aws.AwsProvider, "key_pair", key_pair)
    return seen


def secrets_in(output: str, key: str) -> list[str]:
    body = [line for line in key.splitlines() if len(line) > 20 and "-----" not in line]
    found = [line for line in body if line in output]
    found += [word for word in ("PRIVATE KEY", "session-token-do-not-log") if word in output]
    return found


@needs_netns
@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["-v"], ["-vv"], ["-vv", "--debug-libraries"]])
def test_no_secret_in_the_output_at_any_verbosity(flags, tmp_path, tiny_data_dir, moto_url, ec2, captured_key,
                                                  monkeypatch):
    """A start that creates a key pair, then fails: at every verbosity, no key and no session token."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-do-not-log")

    def fail(step: str) -> None:
        if step == "security_group":
            raise ProviderError("injected failure after the key pair and the group")

    monkeypatch.setattr(aws.AwsProvider, "on_step", staticmethod(fail))
    aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2))
    code, output = run_cli(*flags, "--config", str(tmp_path / "cluster.ini"), "start")
    assert code != 0 and "injected failure" in output
    assert captured_key, "the start never created its key pair"
    assert secrets_in(output, captured_key[0]) == []
    libraries = "DEBUG botocore" in output
    assert libraries == ("--debug-libraries" in flags)  # library debug only when asked for by name
    if "--debug-libraries" in flags:
        assert "redacted]" in output  # the key was in botocore's debug output, and the filter took it out
    if "-vv" in flags:
        assert "DEBUG controller" in output or "INFO controller" in output
    assert tagged(ec2) == NOTHING


@needs_netns
@pytest.mark.slow
def test_aws_vv_start_logs_no_key_listens_on_loopback_and_keeps_keys_private(
        tmp_path, tiny_data_dir, moto_url, ec2, hosts, mapped, captured_key, monkeypatch):
    """The issue's case: `cluster -vv start` on EC2 printed the new key pair's private key twice."""
    config = aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2), slaves=1,
                        extra=f"ssh_from = {hosts.hosts[0].master_address}/32")
    ini = str(tmp_path / "cluster.ini")
    code, output = run_cli("-vv", "--config", ini, "start")
    try:
        assert code == 0, output
        assert secrets_in(output, captured_key[0]) == []
        state_dir = config.state_dir
        # moto's subnets are not this master's: engines come back through SSH tunnels to loopback
        sockets = listening(state_dir)
        assert sockets and addresses(sockets) == {"127.0.0.1"}, sockets
        assert_private_files(state_dir)
        folder = state_dir / "aws" / "test"
        assert mode(folder) == 0o700
        (pem,) = folder.glob("*.pem")
        assert mode(pem) == 0o600 and mode(folder / "known_hosts") == 0o600
        tunnel_spec = state_dir / "tunnels" / "test" / "tunnels.json"
        assert mode(tunnel_spec) == 0o600
        (engine_file,) = (ipcluster.profile_dir(state_dir) / "security").glob("*-engine.json")
        hmac_key = json.loads(engine_file.read_text())["key"]
        assert hmac_key and hmac_key not in tunnel_spec.read_text()  # the spec names hosts and ports, no key
    finally:
        code, output = run_cli("-vv", "--config", ini, "stop")
    assert code == 0, output
    assert secrets_in(output, captured_key[0]) == []
    assert tagged(ec2) == NOTHING


def test_the_filter_redacts_key_material_tokens_and_connection_keys():
    from controller.logs import redact

    text = ('{"KeyMaterial": "-----BEGIN OPENSSH PRIVATE KEY-----\\nb3BlbnNzaC1rZXktdjEAAAA\\n'
            '-----END OPENSSH PRIVATE KEY-----", "KeyName": "k"} X-Amz-Security-Token: abc123 '
            "Authorization: AWS4-HMAC-SHA256 Credential=AKIA/x, Signature=deadbeef "
            '{"key": "0f1e2d3c", "curve_serverkey": "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"}')
    cleaned = redact(text)
    for secret in ("PRIVATE KEY", "b3BlbnNzaC1rZXktdjE", "abc123", "AWS4-HMAC", "deadbeef", "0f1e2d3c", "rq:rM"):
        assert secret not in cleaned, (secret, cleaned)
    assert '"KeyName": "k"' in cleaned  # what is not secret stays readable

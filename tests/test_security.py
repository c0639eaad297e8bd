"""Exposure checks on real parts: what listens where after a start, who can read the files, what the logs say.

Every provider starts for real (local engines; sshd in network namespaces for ssh; moto's EC2 server and
namespace hosts for aws), then the test looks at the controller's listening sockets with psutil, at the
modes of state_dir, keys and connection files, and at everything the CLI wrote at each verbosity.
The aws cluster that starts at -vv is test_aws_provider.py's spot cluster (TestASpotSlave): one start
serves its checks and these.
"""

from __future__ import annotations

import json
import sys

import pytest
import zmq

from controller.api import Cluster
from controller.errors import ProviderError
from controller.ipp.profile import engine_file, profile_dir, url_file
from tests.aws import NOTHING, aws_config, image, set_provider_hooks, tagged
from tests.exposure import addresses, assert_private_files, capture_keys, listening, run_cli, secrets_in
from tests.helpers import make_config, running_cluster
from tests.netns import SLAVE_USER, NetnsHosts, client_key, unavailable

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


def ports_of(connection: dict) -> set[int]:
    ports = set()
    for key, value in connection.items():
        if key in (
            "registration",
            "control",
            "mux",
            "task",
            "iopub",
            "notification",
            "hb_ping",
            "hb_pong",
            "broadcast",
        ):
            ports.update(value if isinstance(value, list) else [value])
    return ports


def test_local_cluster_listens_on_loopback_only_and_keeps_its_files_private(tmp_path, tiny_data_dir):
    with running_cluster(tmp_path, tiny_data_dir) as cluster:
        sockets = listening(cluster.config.state_dir)
        assert sockets and addresses(sockets) == {"127.0.0.1"}, sockets
        assert_private_files(cluster.config.state_dir)
        engine = json.loads(
            engine_file(
                profile_dir(cluster.config.state_dir), cluster.store.clusters.active("test").ipp_cluster_id
            ).read_text()
        )
        assert not engine.get("curve_serverkey")  # loopback only: the HMAC key signs every message


def ssh_config(tmp_path, data_dir, hosts, tunnel: str, slaves: int = 1):
    for host in hosts.hosts[:slaves]:
        host.authorized_keys.write_text("")  # the aws tests of this module authorise their own keys
        host.authorize(hosts.key)
    return make_config(
        tmp_path,
        data_dir,
        slaves=slaves,
        extra=f"""
provider = ssh

[ssh]
hosts = {", ".join(h.address for h in hosts.hosts[:slaves])}
user = {SLAVE_USER}
key_file = {hosts.key}
python = {sys.executable}
tunnel = {tunnel}
""",
    )


def registration_reply(url: str, connection: dict, curve: bool, timeout_ms: int) -> bool:
    """A raw ZeroMQ client asks the controller's registration port for its connection info.

    It signs with the connection file's HMAC key; with ``curve`` it also knows the controller's
    CurveZMQ public key (as ipyparallel.Client does when it reads the file).  True if any reply came.
    """
    from jupyter_client.session import Session

    session = Session(
        key=connection["key"].encode(),
        signature_scheme=connection["signature_scheme"],
        packer=connection["pack"],
        unpacker=connection["unpack"],
    )
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
        profile = profile_dir(cluster.config.state_dir)
        client = json.loads(url_file(profile, record.ipp_cluster_id).read_text())
        engine = json.loads(engine_file(profile, record.ipp_cluster_id).read_text())
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
        profile = profile_dir(cluster.config.state_dir)
        client = json.loads(url_file(profile, record.ipp_cluster_id).read_text())
        engine = json.loads(engine_file(profile, record.ipp_cluster_id).read_text())
        sockets = listening(cluster.config.state_dir)
        assert addresses(sockets, ports_of(engine) | ports_of(client)) == {"0.0.0.0"}
        assert addresses(sockets) == {"0.0.0.0", "127.0.0.1"}  # the monitor and schedulers: loopback
        for host in hosts.hosts:
            assert_only_curve_clients_are_answered(engine, host, host.master_address)
    finally:
        cluster.stop()
        cluster.close()


@pytest.fixture
def captured_key(monkeypatch) -> list[str]:
    return capture_keys(monkeypatch)


@needs_netns
@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["-v"], ["-vv"], ["-vv", "--debug-libraries"]])
def test_no_secret_in_the_output_at_any_verbosity(
    flags, tmp_path, tiny_data_dir, moto_url, ec2, captured_key, monkeypatch
):
    """A start that creates a key pair, then fails: at every verbosity, no key and no session token."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-do-not-log")

    def fail(step: str) -> None:
        if step == "security_group":
            raise ProviderError("injected failure after the key pair and the group")

    set_provider_hooks(monkeypatch, on_step=fail)
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


def test_the_filter_redacts_key_material_tokens_and_connection_keys():
    from controller.logs import redact

    text = (
        '{"KeyMaterial": "-----BEGIN OPENSSH PRIVATE KEY-----\\nb3BlbnNzaC1rZXktdjEAAAA\\n'
        '-----END OPENSSH PRIVATE KEY-----", "KeyName": "k"} X-Amz-Security-Token: abc123 '
        "Authorization: AWS4-HMAC-SHA256 Credential=AKIA/x, Signature=deadbeef "
        '{"key": "0f1e2d3c", "curve_serverkey": "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"}'
    )
    cleaned = redact(text)
    for secret in ("PRIVATE KEY", "b3BlbnNzaC1rZXktdjE", "abc123", "AWS4-HMAC", "deadbeef", "0f1e2d3c", "rq:rM"):
        assert secret not in cleaned, (secret, cleaned)
    assert '"KeyName": "k"' in cleaned  # what is not secret stays readable

"""provider = aws against moto's server over real HTTP, slaves as network-namespace hosts with real sshd.

Every EC2 call is real boto3 to ``ThreadedMotoServer`` through endpoint_url.
moto's instances never boot, so ``Hooks.address`` (test-only, the one mock
here, handed to the provider's constructor) maps each instance to a namespace
host and installs the instance's key pair there as cloud-init would; SSH, SFTP,
tunnels, engines and the controller are all real.  What every provider promises
(start, list, stop twice, a failure after each start step, release after the
store is lost) is in test_provider_contract.py; here what is aws's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import socket
import stat
import sys

import pytest

from controller.api import Cluster
from controller.cli import main
from controller.errors import ClusterStateError, ConfigError, CredentialsError
from controller.ipp import processes
from controller.ipp.profile import profile_dir
from controller.providers import aws
from controller.providers.aws import ec2 as ec2_calls
from controller.providers.aws import network
from controller.store import Store
from tests import exposure
from tests.aws import NOTHING, REGION, aws_config, fresh_ec2, image, map_instances, set_provider_hooks, tagged
from tests.helpers import cluster_pids, wait_until
from tests.netns import SLAVE_USER, NetnsHosts, unavailable

REASON = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(REASON), reason=REASON or "ok")]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with NetnsHosts(2, tmp_path_factory.mktemp("netns"), first_subnet=11) as made:
        yield made


@pytest.fixture
def mapped(hosts, monkeypatch):
    return map_instances(hosts, monkeypatch)


def no_engines(hosts) -> bool:
    return wait_until(lambda: not any(h.engine_processes() for h in hosts.hosts), timeout=20)


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@dataclasses.dataclass
class Started:
    """A cluster a class's tests share, with the EC2 client, instance -> host mapping and what start said."""

    cluster: Cluster
    ec2: object
    mapped: dict
    status: object
    folder: object
    output: str = ""  # what `cluster -vv start` wrote, when the CLI started it
    key: str = ""  # the private key that start created


@contextlib.contextmanager
def started_cluster(folder, data_dir, moto_url, hosts, slaves: int = 1, cli: bool = False, **environ):
    """A fresh moto, then an aws cluster of ``slaves`` started on the namespace hosts (``environ`` set
    meanwhile; with ``cli`` by `cluster -vv start` in this process), stopped and closed at the end
    whatever the tests did to it."""
    with pytest.MonkeyPatch.context() as patch:
        client = fresh_ec2(moto_url, patch)
        assigned = map_instances(hosts, patch)
        for name, value in environ.items():
            patch.setenv(name, value)
        config = aws_config(folder, data_dir, moto_url, image(client), slaves=slaves)
        keys = exposure.capture_keys(patch)
        cluster = None
        try:
            if cli:
                code, output = exposure.run_cli("-vv", "--config", str(config.source), "start")
                assert code == 0, output
                cluster = Cluster(config)
                status = cluster.status()
            else:
                cluster, output = Cluster(config), ""
                status = cluster.start()
            yield Started(cluster, client, assigned, status, folder, output, keys[0] if keys else "")
        finally:
            if cluster is not None:
                cluster.close()  # (a test may have closed it already: a session that ended)
            with Cluster(config) as last:
                last.stop()


def running_nodes(cluster: Cluster) -> list:
    return [n for n in cluster.status().nodes if n.state == "running"]


@pytest.fixture(scope="class")
def spot(tmp_path_factory, tiny_data_dir, moto_url, hosts):
    with started_cluster(tmp_path_factory.mktemp("spot"), tiny_data_dir, moto_url, hosts, cli=True) as started:
        yield started


class TestASpotSlave:
    """One 1-slave spot cluster for the class (a start costs more than every check on it together).
    Each test asserts one property of it; the last two change it (scale, then stop)."""

    def test_starts_tagged_with_a_group_open_only_to_ssh_from_the_master_and_a_private_key(self, spot):
        status, config = spot.status, spot.cluster.config
        assert status.state == "running"
        assert [e.host for e in status.engines] == ["slave11"]
        nodes = status.nodes
        assert len(nodes) == 1 and all(n.market == "spot" and n.instance_type == "g4dn.xlarge" for n in nodes)
        assert all(n.price_per_hour > 0 and n.zone for n in nodes)  # the price each instance runs at
        found = tagged(spot.ec2)
        assert sorted(found["instances"]) == sorted(n.instance_id for n in running_nodes(spot.cluster))
        assert len(found["groups"]) == 1 and len(found["key_pairs"]) == 1
        (group,) = spot.ec2.describe_security_groups(GroupIds=found["groups"])["SecurityGroups"]
        for rule in group["IpPermissions"]:
            assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", []))  # nothing open to the world
            if rule.get("IpRanges"):
                assert (rule["FromPort"], rule["ToPort"]) == (22, 22)  # only SSH, only from the master
                assert [r["CidrIp"] for r in rule["IpRanges"]] == ["10.213.0.0/16"]
            else:
                assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [group["GroupId"]]
        (key_file,) = (config.state_dir / "aws" / "test").glob("*.pem")
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    def test_a_vv_start_logs_no_key_listens_on_loopback_and_keeps_keys_private(self, spot):
        """The issue's case: `cluster -vv start` on EC2 printed the new key pair's private key twice."""
        assert spot.key, "the start never created its key pair"
        assert exposure.secrets_in(spot.output, spot.key) == []
        state_dir = spot.cluster.config.state_dir
        # moto's subnets are not this master's: engines come back through SSH tunnels to loopback
        sockets = exposure.listening(state_dir)
        assert sockets and exposure.addresses(sockets) == {"127.0.0.1"}, sockets
        exposure.assert_private_files(state_dir)
        folder = state_dir / "aws" / "test"
        assert exposure.mode(folder) == 0o700
        (pem,) = folder.glob("*.pem")
        assert exposure.mode(pem) == 0o600 and exposure.mode(folder / "known_hosts") == 0o600
        tunnel_spec = state_dir / "tunnels" / "test" / "tunnels.json"
        assert exposure.mode(tunnel_spec) == 0o600
        (engine_file,) = (profile_dir(state_dir) / "security").glob("*-engine.json")
        hmac_key = json.loads(engine_file.read_text())["key"]
        assert hmac_key and hmac_key not in tunnel_spec.read_text()  # the spec names hosts and ports, no key

    def test_engines_come_back_through_ssh_reverse_tunnels(self, spot, hosts):
        """moto's subnets are not the master's: the engines' connection file points at their loopback."""
        conn = json.loads(next((hosts.hosts[0].dir / "home").glob(".cluster-engine/run/test/engine.json")).read_text())
        assert conn["interface"] == "tcp://127.0.0.1"
        assert (spot.cluster.config.state_dir / "tunnels" / "test" / "tunnels.pid").exists()

    def test_trains(self, spot):
        run = spot.cluster.train(subset=200, epochs=1)
        assert run.run.state == "completed" and run.run.host in {e.host for e in spot.cluster.status().engines}

    def test_status_ip_and_ssh_show_the_slave(self, spot, monkeypatch):
        nodes = running_nodes(spot.cluster)
        monkeypatch.setenv("CLUSTER_CONFIG", str(spot.cluster.config.source))
        code, out, _ = run_cli("status")
        assert code == 0 and "spot" in out and "g4dn.xlarge" in out
        code, out, _ = run_cli("ip", "--json")
        assert code == 0 and {n["node"] for n in json.loads(out)["nodes"]} >= {n.instance_id for n in nodes}
        code, out, _ = run_cli("ssh", nodes[0].instance_id, "--print")
        assert code == 0 and "StrictHostKeyChecking=yes" in out and f"{SLAVE_USER}@" in out

    def test_cluster_ssh_uses_the_address_bootstrap_used(self, spot, monkeypatch):
        """known_hosts holds the key under the address bootstrap reached; `cluster ssh` must use that one."""
        import shlex
        import subprocess

        node = running_nodes(spot.cluster)[0]
        monkeypatch.setenv("CLUSTER_CONFIG", str(spot.cluster.config.source))
        code, out, err = run_cli("ssh", node.instance_id, "--print")
        assert code == 0, err
        command = shlex.split(out.strip())
        host = spot.mapped[node.instance_id]
        assert command[-1] == f"{SLAVE_USER}@{host.address}"  # not the public address moto gave the instance
        done = subprocess.run(
            command[:-1] + ["-o", "BatchMode=yes", command[-1], "hostname"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and done.stdout.strip() == host.hostname, done.stderr

    def test_scale_up_and_down_and_a_spot_notice_gets_a_replacement_instance(self, spot):
        from controller.cluster.keeper_loop import Keeper

        cluster, ec2, mapped = spot.cluster, spot.ec2, spot.mapped
        state_of = lambda i: ec2.describe_instances(InstanceIds=[i])["Reservations"][0]["Instances"][0]["State"]["Name"]  # noqa: E731
        (first,) = [n.instance_id for n in running_nodes(cluster)]
        status = cluster.scale(2)  # the same launch path as start: spot, types and zones in order
        (second,) = [n.instance_id for n in status.nodes if n.state == "running" and n.instance_id != first]
        assert sorted(e.host for e in status.engines if e.state == "idle") == ["slave11", "slave12"]
        # the added slave's engines came back through tunnels of their own
        assert list((cluster.config.state_dir / "tunnels" / "test").glob("add-*/tunnels.pid"))

        status = cluster.scale(1)  # the newest goes: drained, engines stopped, instance terminated
        assert state_of(second) == "terminated" and state_of(first) == "running"
        assert {n.instance_id: n.state for n in status.nodes}[second] == "terminated"
        del mapped[second]  # test mapping: its namespace host may serve the next instance

        # a scheduler reported a spot interruption notice on the first slave's engine: the keeper asks for
        # a replacement at once, then releases the noticed slave once drained
        record = cluster.record
        (engine,) = [e for e in cluster.store.engines.of(record.id) if e.node_id == first]
        cluster.store.engines.mark_leaving(record.id, engine.engine_id, "notice")
        cluster.store.clusters.update(record.id, replace_lost=1)
        decision = Keeper(cluster, record.id).tick()
        assert decision.add == 1 and decision.replaces == first and f"spot notice on {first}" in decision.add_why
        (third,) = [i for i in tagged(ec2)["instances"] if i not in (first, second)]
        assert state_of(third) == "running" and state_of(first) == "terminated"
        status = cluster.status()
        assert [e.host for e in status.engines if e.state == "idle"] == ["slave12"]
        assert (status.target, status.current) == (1, 1)
        assert any("(replacing " + first in e.detail for e in status.events)

    def test_stop_ends_it_and_an_untracked_instance_of_the_cluster_without_leaks(self, spot, hosts, monkeypatch):
        """An instance with the cluster's tag that the store does not know: status shows it, stop ends it."""
        cluster, ec2 = spot.cluster, spot.ec2
        stray = tagged_instance(ec2, "test", aws.owner())
        assert {n.node_id: n.state for n in cluster.status().nodes}[stray].startswith("untracked")
        monkeypatch.setenv("CLUSTER_CONFIG", str(cluster.config.source))
        code, out, _ = run_cli("status")
        assert code == 0 and "untracked" in out
        cluster.close()  # this session ends; `cluster -vv stop` stops it, and logs no key either
        code, output = exposure.run_cli("-vv", "--config", str(cluster.config.source), "stop")
        assert code == 0, output
        assert exposure.secrets_in(output, spot.key) == []
        assert tagged(ec2) == NOTHING
        assert no_engines(hosts)
        assert wait_until(lambda: not cluster_pids(cluster.config.state_dir), timeout=20)
        assert not list((cluster.config.state_dir / "aws" / "test").glob("*.pem"))


@pytest.fixture(scope="class")
def alices(tmp_path_factory, tiny_data_dir, moto_url, hosts):
    """alice started a 1-slave cluster (the owner tag says alice@host) and closed her session."""
    with started_cluster(
        tmp_path_factory.mktemp("alice"), tiny_data_dir, moto_url, hosts, USER="alice", LOGNAME="alice"
    ) as started:
        started.cluster.close()
        yield started


class TestStopOfTheStoredInstances:
    """One start of alice's for the class; bob stops it, once refused, once with [aws] region edited."""

    @staticmethod
    def as_bob(monkeypatch):
        monkeypatch.setenv("USER", "bob")
        monkeypatch.setenv("LOGNAME", "bob")

    def test_an_instance_ec2_refuses_to_terminate_is_named_with_exit_4_never_marked_terminated(
        self, alices, monkeypatch
    ):
        self.as_bob(monkeypatch)
        config, ec2 = alices.cluster.config, alices.ec2
        (node,) = alices.status.nodes
        assert tagged(ec2)["instances"] == [node.instance_id]
        ec2.modify_instance_attribute(InstanceId=node.instance_id, DisableApiTermination={"Value": True})
        try:
            code, out, err = run_cli("--config", str(config.source), "stop")
            assert code == 4 and node.instance_id in err and "NOT terminated" in err, err
            assert node.instance_id in running(ec2)
            with Store(config.state_dir) as store:
                (stored,) = store.nodes.of(store.clusters.latest("test").id)
                assert stored.state == "running"  # the store tells the truth: still running, still billed
        finally:
            ec2.modify_instance_attribute(InstanceId=node.instance_id, DisableApiTermination={"Value": False})

    def test_whoever_stops_it_ends_the_stored_instances_in_the_region_they_were_launched_in(
        self, alices, tiny_data_dir, moto_url, hosts, monkeypatch
    ):
        """bob runs the stop, [aws] region edited since the start: the stored ids end where they run."""
        self.as_bob(monkeypatch)
        assert alices.status.nodes[0].zone.startswith(REGION)
        edited = Cluster(
            aws_config(alices.folder, tiny_data_dir, moto_url, image(alices.ec2), slaves=1, extra="region = us-west-2")
        )
        try:
            edited.stop()
        finally:
            edited.close()
        assert tagged(alices.ec2) == NOTHING  # in us-east-1: the instance, alice's group and key pair too
        assert no_engines(hosts)


# `cluster start` in its own process; test-only: every instance's SSH address is the test's silent listener
SILENT_START = """
import faulthandler, signal, sys
from controller.api import Cluster
from controller.cli import main
from controller.providers import Hooks

address, port, config = sys.argv[1], int(sys.argv[2]), sys.argv[3]
Cluster.__init__.__kwdefaults__["provider_hooks"] = Hooks(address=lambda instance, key_file: (address, port),
                                                          waiter_delay=0.2)
faulthandler.register(signal.SIGUSR1)  # the test asks for every thread's stack if this hangs
# as under a terminal, whatever this test was started from (a shell's background job ignores SIGINT)
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main(["--config", config, "-v", "start"]))
"""


def test_ctrl_c_during_a_start_whose_hosts_never_answer_ssh_exits_within_15_s_leaving_nothing(
    tmp_path, tiny_data_dir, moto_url, ec2
):
    """The reported case: instances that accept TCP and never send an SSH banner. Ctrl-C comes once
    the first SSH connect attempt is under way (the test's listener accepted it), as a terminal sends
    it: SIGINT to the command's whole process group."""
    import os
    import signal
    import subprocess
    import time

    config = aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent.settimeout(0.5)
        log = tmp_path / "start.log"  # a file, not a pipe: processes it starts must not hold our reads open
        master = subprocess.Popen(
            [sys.executable, "-c", SILENT_START, "127.0.0.1", str(silent.getsockname()[1]), str(config.source)],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        held = []
        try:
            deadline = time.monotonic() + 180
            while not held and master.poll() is None and time.monotonic() < deadline:
                try:
                    held.append(silent.accept()[0])  # the first attempt: its TCP connection is open
                except socket.timeout:
                    pass
            if not held:
                pytest.fail(f"no SSH connect attempt came (exit {master.poll()}): {log.read_text()[-3000:]}")
            interrupted = time.monotonic()
            os.killpg(master.pid, signal.SIGINT)
            try:
                master.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(master.pid, signal.SIGUSR1)
                wait_until(lambda: "Thread 0x" in log.read_text(), timeout=10)
                pytest.fail(f"Ctrl-C did not end the start: {log.read_text()[-6000:]}")
            took = time.monotonic() - interrupted
        finally:
            if master.poll() is None:
                os.killpg(master.pid, signal.SIGKILL)
                for pid in cluster_pids(config.state_dir):  # its controller runs in a session of its own
                    processes.kill_process_group(pid)
            for connection in held:
                connection.close()
    err = log.read_text()
    print(f"Ctrl-C to exit: {took:.1f} s")
    assert master.returncode == 130, err
    assert took < 15, f"Ctrl-C took {took:.1f} s to act: {err}"
    assert tagged(ec2) == NOTHING
    assert not cluster_pids(config.state_dir)
    with Store(config.state_dir) as store:
        assert store.clusters.latest("test").state == "stopped"
    assert not list(config.state_dir.glob("aws/test/*.pem"))


def tagged_instance(ec2, cluster: str, owner: str) -> str:
    """An instance as another start of this tool would leave it (tool, cluster and owner tags)."""
    return ec2.run_instances(
        ImageId=image(ec2),
        InstanceType="g4dn.xlarge",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "gpu-cluster:tool", "Value": "gpu-cluster"},
                    {"Key": "gpu-cluster:cluster", "Value": cluster},
                    {"Key": "gpu-cluster:owner", "Value": owner},
                ],
            }
        ],
    )["Instances"][0]["InstanceId"]


def running(ec2) -> set[str]:
    return {
        i["InstanceId"]
        for r in ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] == "running"
    }


def test_stop_all_ends_only_this_owners_clusters_after_listing_them(tmp_path, tiny_data_dir, moto_url, ec2):
    mine = [tagged_instance(ec2, name, aws.owner()) for name in ("one", "two")]
    theirs = tagged_instance(ec2, "one", "someone@elsewhere")
    not_ours = ec2.run_instances(ImageId=image(ec2), InstanceType="t3.micro", MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    ini = str(aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2)).source)

    # no terminal to ask on and no --yes: refused, nothing ended, the list shown
    code, out, err = run_cli("--config", ini, "stop", "--all")
    assert code == 2 and "--yes" in err and all(i in err for i in mine) and theirs not in err
    assert running(ec2) == {*mine, theirs, not_ours}

    code, out, err = run_cli("--config", ini, "stop", "--all", "--yes")
    assert code == 0, err
    assert running(ec2) == {theirs, not_ours}  # another master's cluster of the same name is left alone

    code, out, err = run_cli("--config", ini, "stop", "--any-owner")
    assert code == 2 and "--all" in err
    code, out, err = run_cli("--config", ini, "stop", "--all", "--any-owner", "--yes")
    assert code == 0, err
    assert running(ec2) == {not_ours}  # only what is not this tool's stays


@pytest.mark.parametrize("answer, ended", [("n", False), ("y", True)])
def test_stop_all_asks_on_a_terminal(answer, ended, tmp_path, tiny_data_dir, moto_url, ec2):
    import os

    mine = tagged_instance(ec2, "one", aws.owner())
    ini = str(aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2)).source)
    leader, follower = os.openpty()  # a real terminal: the user types the answer
    os.write(leader, f"{answer}\n".encode())
    with os.fdopen(follower, "r") as terminal:
        out, err = io.StringIO(), io.StringIO()
        code = main(["--config", ini, "stop", "--all"], stdout=out, stderr=err, stdin=terminal)
    os.close(leader)
    assert mine in err.getvalue() and "[y/N]" in err.getvalue()
    assert code == (0 if ended else 1)
    assert (mine in running(ec2)) is not ended


def test_release_after_a_failed_start_uses_the_launch_replies(tmp_path, tiny_data_dir, moto_url, ec2, monkeypatch):
    """describe-by-tag is eventually consistent: right after the launch it may list nothing."""
    hidden: list[str] = []

    def not_yet_listed(params, **kwargs):  # test-only: EC2's answer before tags are searchable
        body = params.get("body") or {}
        if any(k.startswith("Filter") for k in body):
            hidden.append("describe")
            return type("Ok", (), {"status_code": 200})(), {"Reservations": []}
        return None

    original = ec2_calls.client

    def client(*args):
        made = original(*args)
        made.meta.events.register("before-call.ec2.DescribeInstances", not_yet_listed)
        return made

    def fail(step: str) -> None:
        if step == "fleet":
            raise RuntimeError("injected failure after the launch")

    monkeypatch.setattr(ec2_calls, "client", client)
    set_provider_hooks(monkeypatch, on_step=fail)
    cluster = Cluster(aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2)))
    with pytest.raises(RuntimeError, match="injected"):
        cluster.start()
    assert hidden  # the tag search really answered nothing
    assert tagged(ec2)["instances"] == []
    cluster.close()


def test_slaves_launch_with_imdsv2_required(tmp_path, tiny_data_dir, moto_url, ec2):
    config = aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2))
    with Store(config.state_dir) as store:
        provider = aws.AwsProvider(config, store)
        client = provider.ec2()
        subnets = network.subnets(client, config.aws)
        key, _ = network.key_pair(client, config, "test")
        group = network.security_group(client, config, "test", subnets[0]["VpcId"])
        (launched,) = ec2_calls.launch(
            client, config.aws, "test", image(ec2), subnets, key, group, slaves=1, required=1
        )
        (described,) = ec2_calls.describe(client, [launched["InstanceId"]])
        options = described["MetadataOptions"]
        assert options["HttpTokens"] == "required" and options["HttpPutResponseHopLimit"] == 1
        provider.releaser().release(client, "test")
    assert tagged(ec2) == NOTHING


def test_prices_per_zone_beside_on_demand_before_any_start(tmp_path, tiny_data_dir, moto_url, ec2):
    config = aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2))
    code, out, err = run_cli(
        "--config", str(tmp_path / "cluster.ini"), "prices", "--instance-types", "g4dn.xlarge,g5.xlarge", "--json"
    )
    assert code == 0, err
    rows = json.loads(out)["prices"]
    assert {r["instance_type"] for r in rows} == {"g4dn.xlarge", "g5.xlarge"}
    assert all(r["spot"] is not None and r["zone"].startswith(REGION) for r in rows)
    assert len({r["zone"] for r in rows}) > 1  # one row per availability zone
    assert {r["on_demand"] for r in rows if r["instance_type"] == "g5.xlarge"} == {1.006}
    code, out, err = run_cli("--config", str(tmp_path / "cluster.ini"), "prices")
    assert code == 0 and "g4dn.xlarge" in out
    assert not config.state_dir.exists()  # no store, no provider: nothing written


@pytest.mark.parametrize(
    "extra, error, match",
    [
        ("instance_types = g4dn.nosuch", ConfigError, "instance_types"),
        ("instance_types = not a type", ConfigError, "instance_types"),
        ("max_spot_price = cheap", ConfigError, "max_spot_price"),
        ("region =", ConfigError, "region"),
        ("ssh_from = 0.0.0.0/0", ConfigError, "whole internet"),
        ("ami = auto", ConfigError, "Deep Learning"),
        ("__no_credentials__", CredentialsError, "credentials"),
    ],
)
def test_bad_input_fails_clearly_and_creates_nothing(
    extra, error, match, tmp_path, tiny_data_dir, moto_url, ec2, monkeypatch
):
    if extra == "__no_credentials__":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask an instance-metadata address
        extra = ""
    try:
        config = aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2), extra=extra)
    except ConfigError as caught:
        assert match in str(caught)
        assert tagged(ec2) == NOTHING
        return
    cluster = Cluster(config)
    with pytest.raises(error, match=match):
        cluster.start()
    assert tagged(ec2) == NOTHING
    assert cluster.store.clusters.latest("test") is None  # refused before anything, the controller included
    cluster.close()


def test_start_refuses_to_over_create_and_leaves_existing_alone(tmp_path, tiny_data_dir, moto_url, ec2):
    """Instances of this cluster already run (another state_dir, or state lost): refuse, touch nothing."""
    existing = ec2.run_instances(
        ImageId=image(ec2),
        InstanceType="g4dn.xlarge",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "gpu-cluster:tool", "Value": "gpu-cluster"},
                    {"Key": "gpu-cluster:cluster", "Value": "test"},
                    {"Key": "gpu-cluster:owner", "Value": aws.owner()},
                ],
            }
        ],
    )["Instances"][0]["InstanceId"]
    cluster = Cluster(aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2)))
    with pytest.raises(ClusterStateError, match="already has instances"):
        cluster.start()
    assert tagged(ec2)["instances"] == [existing]
    assert cluster.stop().cluster is None  # no record: `cluster stop` releases them by tag
    assert tagged(ec2) == NOTHING
    cluster.close()


@pytest.mark.parametrize(
    "code, kind, words",
    [
        ("InsufficientInstanceCapacity", "CapacityError", "no capacity"),
        ("SpotMaxPriceTooLow", "CapacityError", "max_spot_price"),
        ("MaxSpotInstanceCountExceeded", "CapacityError", "quota"),
        ("VcpuLimitExceeded", "CapacityError", "quota"),
        ("UnauthorizedOperation", "CredentialsError", "IAM policy"),
        ("AuthFailure", "CredentialsError", "refused"),
        ("InvalidInstanceType", "ConfigError", "InvalidInstanceType"),
        ("InternalError", "ProviderError", "InternalError"),
    ],
)
def test_ec2_errors_are_sorted_into_capacity_credentials_and_the_rest(code, kind, words):
    """The error EC2 would send (botocore's own ClientError), as the error the user sees."""
    from botocore.exceptions import ClientError, NoCredentialsError

    error = aws.classify(ClientError({"Error": {"Code": code, "Message": "from EC2"}}, "RunInstances"), "launching")
    assert type(error).__name__ == kind and words in str(error)
    assert isinstance(aws.classify(NoCredentialsError(), "x"), CredentialsError)


def test_each_client_signs_with_the_credentials_there_are_when_it_is_made(
    tmp_path, tiny_data_dir, moto_url, ec2, monkeypatch
):
    """Clients share EC2's parsed service data (a process makes many: every status makes one), never
    credentials: a key rotated in the environment is the next client's."""
    config = aws_config(tmp_path, tiny_data_dir, moto_url, "ami-unused")

    def key_of_a_new_client() -> str:
        signed: list[str] = []
        client = ec2_calls.client(config)
        client.meta.events.register(
            "before-send.ec2", lambda request, **_: signed.append(str(request.headers["Authorization"]))
        )
        client.describe_instances()
        return signed[0]

    assert "Credential=testing/" in key_of_a_new_client()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated")
    assert "Credential=rotated/" in key_of_a_new_client()


def refuse_spot(client, kinds: set[str]) -> list[str]:
    """Test-only: EC2 answers InsufficientInstanceCapacity to spot requests for ``kinds``.

    moto always has capacity, so the error EC2 sends is injected at botocore's
    before-call event of the real client; the request is otherwise real.
    """
    seen: list[str] = []

    class Refused:
        status_code = 500

    def before_call(params, **kwargs):
        body = params.get("body") or {}
        spot = body.get("InstanceMarketOptions.MarketType") == "spot"
        seen.append(f"{'spot' if spot else 'on-demand'} {body.get('InstanceType')} {body.get('SubnetId')}")
        if spot and body.get("InstanceType") in kinds:
            return Refused(), {"Error": {"Code": "InsufficientInstanceCapacity", "Message": "no capacity (injected)"}}
        return None

    client.meta.events.register("before-call.ec2.RunInstances", before_call)
    return seen


def test_capacity_falls_through_types_and_zones_then_on_demand(tmp_path, tiny_data_dir, moto_url, ec2):
    from controller.errors import CapacityError
    from controller.store import Store

    config = aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2), extra="on_demand_fallback = false")
    with Store(config.state_dir) as store:
        provider = aws.AwsProvider(config, store)
        client = provider.ec2()
        subnets = network.subnets(client, config.aws)
        key, _ = network.key_pair(client, config, "test")
        group = network.security_group(client, config, "test", subnets[0]["VpcId"])
        seen = refuse_spot(client, {"g4dn.xlarge"})
        # g4dn spot refused in every zone: the next type, g5, gets the instances, still spot
        got = ec2_calls.launch(client, config.aws, "test", image(ec2), subnets, key, group, slaves=2, required=2)
        assert {i["InstanceType"] for i in got} == {"g5.xlarge"} and {i["_market"] for i in got} == {"spot"}
        assert len([s for s in seen if s.startswith("spot g4dn")]) == len(subnets) > 1

        refuse_spot(client, {"g5.xlarge"})  # now no spot anywhere: a clear error, nothing launched
        with pytest.raises(CapacityError, match="only 0 of the 2 slaves.*on_demand_fallback"):
            ec2_calls.launch(client, config.aws, "test", image(ec2), subnets, key, group, slaves=2, required=2)
        assert len(tagged(ec2)["instances"]) == 2
        provider.releaser().release(client, "test")
        assert tagged(ec2) == NOTHING

    config = aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2), extra="on_demand_fallback = true")
    with Store(config.state_dir) as store:
        provider = aws.AwsProvider(config, store)
        client = provider.ec2()
        refuse_spot(client, {"g4dn.xlarge", "g5.xlarge"})
        subnets = network.subnets(client, config.aws)
        key, _ = network.key_pair(client, config, "test")
        group = network.security_group(client, config, "test", subnets[0]["VpcId"])
        got = ec2_calls.launch(client, config.aws, "test", image(ec2), subnets, key, group, slaves=2, required=2)
        assert {i["_market"] for i in got} == {"on-demand"} and {i["InstanceType"] for i in got} == {"g4dn.xlarge"}
        assert provider.node_of(client, got[0], image(ec2)).price_per_hour == aws.ON_DEMAND_USD["g4dn.xlarge"]
        provider.releaser().release(client, "test")
    assert tagged(ec2) == NOTHING


def test_stop_by_tag_leaves_another_masters_cluster_of_the_same_name_alone(tmp_path, tiny_data_dir, moto_url, ec2):
    """Cluster names repeat ("default"): with the local state lost, stop releases only this master's."""
    theirs = ec2.run_instances(
        ImageId=image(ec2),
        InstanceType="g4dn.xlarge",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "gpu-cluster:tool", "Value": "gpu-cluster"},
                    {"Key": "gpu-cluster:cluster", "Value": "test"},
                    {"Key": "gpu-cluster:owner", "Value": "someone@elsewhere"},
                ],
            }
        ],
    )["Instances"][0]["InstanceId"]
    cluster = Cluster(aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2)))
    assert not cluster.stop()
    live = [
        i["InstanceId"]
        for r in ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] == "running"
    ]
    assert live == [theirs]
    cluster.close()

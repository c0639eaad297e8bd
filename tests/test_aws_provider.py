"""provider = aws against moto's server over real HTTP, slaves as network-namespace hosts with real sshd.

Every EC2 call is real boto3 to ``ThreadedMotoServer`` through endpoint_url.
moto's instances never boot, so ``aws.ADDRESS_HOOK`` (test-only, the one mock
here) maps each instance to a namespace host and installs the instance's key
pair there as cloud-init would; SSH, SFTP, tunnels, engines and the controller
are all real.  Leak tests fail ``cluster start`` after every step and assert
nothing tagged for the cluster is left in EC2 and no engine runs on a slave.
"""
from __future__ import annotations

import io
import json
import shutil
import socket
import stat
import sys

import pytest

from controller import joining, processes
from controller.api import Cluster
from controller.cli import main
from controller.errors import ClusterStateError, ConfigError, CredentialsError, ProviderError
from controller.providers import aws
from controller.store import Store
from tests.conftest import cluster_pids, make_config, wait_until
from tests.netns import SLAVE_USER, NetnsHosts, unavailable

REASON = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(REASON), reason=REASON or "ok")]
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with NetnsHosts(2, tmp_path_factory.mktemp("netns"), first_subnet=11) as made:
        yield made


@pytest.fixture
def ec2(moto_url, monkeypatch):
    import boto3
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")).read()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setattr(aws.AwsProvider, "waiter_delay", 0.2)
    return boto3.client("ec2", region_name=REGION, endpoint_url=moto_url)


@pytest.fixture
def mapped(hosts, monkeypatch):
    """Test-only: instance -> namespace host, in launch order; the key pair authorised there (cloud-init)."""
    assigned: dict[str, object] = {}
    for host in hosts.hosts:
        host.authorized_keys.write_text("")

    def hook(instance: dict, key_file: str) -> tuple[str, int]:
        if instance["InstanceId"] not in assigned:
            free = [h for h in hosts.hosts if h not in assigned.values()]
            if not free:  # e.g. an instance started behind the tool's back: it has no machine here
                raise ProviderError(f"{instance['InstanceId']}: no namespace host left (test mapping)")
            free[0].authorize(key_file)
            assigned[instance["InstanceId"]] = free[0]
        return assigned[instance["InstanceId"]].address, 22

    monkeypatch.setattr(aws, "ADDRESS_HOOK", hook)
    return assigned


_IMAGE: list[str] = []


def image(ec2) -> str:
    """One of the AMIs moto ships (describing them all is slow: once per module)."""
    if not _IMAGE:
        _IMAGE.append(ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"])
    return _IMAGE[0]


def aws_config(tmp_path, data_dir, moto_url, ami, *, slaves=2, extra=""):
    keys = {"region": REGION, "endpoint_url": moto_url, "instance_types": "g4dn.xlarge, g5.xlarge", "ami": ami,
            "ssh_user": SLAVE_USER, "ssh_from": "10.213.0.0/16", "python": sys.executable}
    for line in extra.splitlines():  # a test's keys replace the defaults above
        if "=" in line:
            key, value = line.split("=", 1)
            keys[key.strip()] = value.strip()
    aws_section = "\n".join(f"{k} = {v}" for k, v in keys.items())
    return make_config(tmp_path, data_dir, slaves=slaves, extra=f"provider = aws\n\n[aws]\n{aws_section}\n")


def tagged(ec2, name="test") -> dict:
    """Everything in EC2 that carries the cluster's tag and is not gone."""
    filters = [{"Name": "tag:gpu-cluster:cluster", "Values": [name]}]
    instances = [i for r in ec2.describe_instances(Filters=filters)["Reservations"] for i in r["Instances"]
                 if i["State"]["Name"] != "terminated"]
    return {
        "instances": [i["InstanceId"] for i in instances],
        "groups": [g["GroupId"] for g in ec2.describe_security_groups(Filters=filters)["SecurityGroups"]],
        "key_pairs": [k["KeyName"] for k in ec2.describe_key_pairs(Filters=filters)["KeyPairs"]],
    }


NOTHING = {"instances": [], "groups": [], "key_pairs": []}


def no_engines(hosts) -> bool:
    return wait_until(lambda: not any(h.engine_processes() for h in hosts.hosts), timeout=20)


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_spot_slaves_train_status_and_stop_without_leaks(tmp_path, tiny_data_dir, moto_url, ec2, hosts, mapped,
                                                         monkeypatch):
    config = aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2))
    cluster = Cluster(config)
    try:
        status = cluster.start()
        assert status.state == "running"
        assert sorted(e.host for e in status.engines) == ["slave11", "slave12"]
        nodes = [n for n in status.nodes]
        assert len(nodes) == 2 and all(n.market == "spot" and n.instance_type == "g4dn.xlarge" for n in nodes)
        assert all(n.price_per_hour > 0 and n.zone for n in nodes)  # the price each instance runs at
        # tags, the security group and the key pair
        found = tagged(ec2)
        assert sorted(found["instances"]) == sorted(n.instance_id for n in nodes)
        assert len(found["groups"]) == 1 and len(found["key_pairs"]) == 1
        (group,) = ec2.describe_security_groups(GroupIds=found["groups"])["SecurityGroups"]
        for rule in group["IpPermissions"]:
            assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", []))  # nothing open to the world
            if rule.get("IpRanges"):
                assert (rule["FromPort"], rule["ToPort"]) == (22, 22)  # only SSH, only from the master
                assert [r["CidrIp"] for r in rule["IpRanges"]] == ["10.213.0.0/16"]
            else:
                assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [group["GroupId"]]
        (key_file,) = (config.state_dir / "aws" / "test").glob("*.pem")
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        # moto's subnets are not the master's: engines came back through SSH reverse tunnels
        conn = json.loads(next((hosts.hosts[0].dir / "home").glob(".cluster-engine/run/test/engine.json")).read_text())
        assert conn["interface"] == "tcp://127.0.0.1"
        assert (config.state_dir / "tunnels" / "test" / "tunnels.pid").exists()

        run = cluster.train(subset=200, epochs=1)
        assert run.run.state == "completed" and run.run.host in ("slave11", "slave12")

        # an instance with the cluster's tag that the store does not know: status shows it, stop ends it
        stray = ec2.run_instances(ImageId=image(ec2), InstanceType="g4dn.xlarge", MinCount=1, MaxCount=1,
                                  TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                      {"Key": "gpu-cluster:tool", "Value": "gpu-cluster"},
                                      {"Key": "gpu-cluster:cluster", "Value": "test"},
                                      {"Key": "gpu-cluster:owner", "Value": aws.owner()}]}])["Instances"][0]["InstanceId"]
        states = {n.node_id: n.state for n in cluster.status().nodes}
        assert states[stray].startswith("untracked")

        monkeypatch.setenv("CLUSTER_CONFIG", str(tmp_path / "cluster.ini"))
        code, out, _ = run_cli("status")
        assert code == 0 and "spot" in out and "g4dn.xlarge" in out and "untracked" in out
        code, out, _ = run_cli("ip", "--json")
        assert code == 0 and {n["node"] for n in json.loads(out)["nodes"]} >= {n.instance_id for n in nodes}
        code, out, _ = run_cli("ssh", nodes[0].instance_id, "--print")
        assert code == 0 and "StrictHostKeyChecking=yes" in out and f"{SLAVE_USER}@" in out
    finally:
        cluster.stop()
    assert tagged(ec2) == NOTHING
    assert no_engines(hosts)
    assert not list((config.state_dir / "aws" / "test").glob("*.pem"))
    assert not cluster.stop() and tagged(ec2) == NOTHING  # safe twice
    cluster.close()


STEPS = ["key_pair", "security_group", "fleet", "running", "ssh", "tunnels", "bootstrap"]


@pytest.mark.parametrize("step", STEPS + ["ctrl-c:bootstrap", "registration"])
def test_failed_start_leaves_nothing(step, tmp_path, tiny_data_dir, moto_url, ec2, hosts, mapped, monkeypatch):
    """A failure (or Ctrl-C) after each step of `cluster start`: nothing tagged remains, no engine runs."""
    error = KeyboardInterrupt if step.startswith("ctrl-c") else RuntimeError
    target = step.split(":")[-1]

    def fail(name: str) -> None:
        if name == target:
            raise error(f"injected failure after {name}")

    monkeypatch.setattr(aws.AwsProvider, "on_step", staticmethod(fail))
    if step == "registration":  # engines up, then the wait for registration fails
        monkeypatch.setattr(joining, "record_engines", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected")))
    cluster = Cluster(aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2)))
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        cluster.start()
    assert tagged(ec2) == NOTHING
    assert no_engines(hosts)
    assert not processes.pid_alive(cluster.store.clusters.latest("test").controller_pid)
    assert wait_until(lambda: not cluster_pids(cluster.config.state_dir), timeout=10)  # schedulers too
    assert not list(cluster.config.state_dir.glob("aws/test/*.pem"))
    cluster.close()


# `cluster start` in its own process; test-only: every instance's SSH address is the test's silent listener
SILENT_START = """
import faulthandler, signal, sys
from controller.cli import main
from controller.providers import aws

address, port, config = sys.argv[1], int(sys.argv[2]), sys.argv[3]
aws.AwsProvider.waiter_delay = 0.2
aws.ADDRESS_HOOK = lambda instance, key_file: (address, port)
faulthandler.register(signal.SIGUSR1)  # the test asks for every thread's stack if this hangs
# as under a terminal, whatever this test was started from (a shell's background job ignores SIGINT)
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main(["--config", config, "-v", "start"]))
"""


def test_ctrl_c_during_a_start_whose_hosts_never_answer_ssh_exits_within_15_s_leaving_nothing(
        tmp_path, tiny_data_dir, moto_url, ec2):
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
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
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


def test_stop_finds_everything_after_local_state_is_lost(tmp_path, tiny_data_dir, moto_url, ec2, hosts, mapped):
    config = aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2), slaves=1)
    cluster = Cluster(config)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    controller_pid = cluster.store.clusters.active("test").controller_pid
    cluster.close()
    assert len(tagged(ec2)["instances"]) == 1
    shutil.rmtree(config.state_dir)  # the laptop's state is gone; the instances are not

    fresh = Cluster(config)
    stopped = fresh.stop()
    assert stopped.cluster is None
    assert tagged(ec2) == NOTHING
    assert len(stopped.released) == 3  # the instance, the security group, the key pair
    fresh.close()
    processes.kill_process_group(controller_pid)  # the master's own orphan, not the provider's to find
    # the orphaned engine on the slave: its instance is terminated (a real one would be gone with it)
    for host in hosts.hosts:
        for pid in host.engine_processes():
            processes.kill_process_group(pid)


def tagged_instance(ec2, cluster: str, owner: str) -> str:
    """An instance as another start of this tool would leave it (tool, cluster and owner tags)."""
    return ec2.run_instances(ImageId=image(ec2), InstanceType="g4dn.xlarge", MinCount=1, MaxCount=1,
                             TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                 {"Key": "gpu-cluster:tool", "Value": "gpu-cluster"},
                                 {"Key": "gpu-cluster:cluster", "Value": cluster},
                                 {"Key": "gpu-cluster:owner", "Value": owner}]}])["Instances"][0]["InstanceId"]


def running(ec2) -> set[str]:
    return {i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
            if i["State"]["Name"] == "running"}


def test_stop_all_ends_only_this_owners_clusters_after_listing_them(tmp_path, tiny_data_dir, moto_url, ec2):
    mine = [tagged_instance(ec2, name, aws.owner()) for name in ("one", "two")]
    theirs = tagged_instance(ec2, "one", "someone@elsewhere")
    not_ours = ec2.run_instances(ImageId=image(ec2), InstanceType="t3.micro", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
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


def test_stop_terminates_the_stored_instances_whoever_runs_it_and_says_what_stayed(
        tmp_path, tiny_data_dir, moto_url, ec2, hosts, mapped, monkeypatch):
    """alice starts, bob stops (the owner tag says alice@host): the stored instance ids still end, and an
    instance EC2 refuses to terminate is named, with exit code 4, never marked terminated."""
    config = aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2), slaves=1)
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("LOGNAME", "alice")
    cluster = Cluster(config)
    try:
        status = cluster.start()
    except BaseException:
        cluster.stop()
        raise
    cluster.close()
    (node,) = status.nodes
    assert tagged(ec2)["instances"] == [node.instance_id]

    monkeypatch.setenv("USER", "bob")
    monkeypatch.setenv("LOGNAME", "bob")
    ini = str(config.source)
    ec2.modify_instance_attribute(InstanceId=node.instance_id, DisableApiTermination={"Value": True})
    code, out, err = run_cli("--config", ini, "stop")
    assert code == 4 and node.instance_id in err and "NOT terminated" in err, err
    assert node.instance_id in running(ec2)
    with Store(config.state_dir) as store:
        (stored,) = store.nodes.of(store.clusters.latest("test").id)
        assert stored.state == "running"  # the store tells the truth: still running, still billed

    ec2.modify_instance_attribute(InstanceId=node.instance_id, DisableApiTermination={"Value": False})
    code, out, err = run_cli("--config", ini, "stop")
    assert code == 0, err
    assert tagged(ec2) == NOTHING  # the instance, and alice's group and key pair too
    assert no_engines(hosts)


def test_stop_terminates_instances_in_the_region_they_were_launched_in(tmp_path, tiny_data_dir, moto_url, ec2, hosts,
                                                                      mapped):
    """[aws] region edited after start: the stored instances are terminated where they run."""
    cluster = Cluster(aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2), slaves=1))
    try:
        (node,) = cluster.start().nodes
    except BaseException:
        cluster.stop()
        raise
    cluster.close()
    assert node.zone.startswith(REGION)
    edited = Cluster(aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2), slaves=1, extra="region = us-west-2"))
    edited.stop()
    edited.close()
    assert tagged(ec2) == NOTHING  # in us-east-1: the instance, its group and its key pair
    assert no_engines(hosts)


def test_release_after_a_failed_start_uses_the_launch_replies(tmp_path, tiny_data_dir, moto_url, ec2, monkeypatch):
    """describe-by-tag is eventually consistent: right after the launch it may list nothing."""
    hidden: list[str] = []

    def not_yet_listed(params, **kwargs):  # test-only: EC2's answer before tags are searchable
        body = params.get("body") or {}
        if any(k.startswith("Filter") for k in body):
            hidden.append("describe")
            return type("Ok", (), {"status_code": 200})(), {"Reservations": []}
        return None

    original = aws.AwsProvider.ec2

    def client(self, *args):
        made = original(self, *args)
        made.meta.events.register("before-call.ec2.DescribeInstances", not_yet_listed)
        return made

    def fail(step: str) -> None:
        if step == "fleet":
            raise RuntimeError("injected failure after the launch")

    monkeypatch.setattr(aws.AwsProvider, "ec2", client)
    monkeypatch.setattr(aws.AwsProvider, "on_step", staticmethod(fail))
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
        subnets = provider.subnets(client)
        key, _ = provider.key_pair(client)
        group = provider.security_group(client, subnets[0]["VpcId"])
        (launched,) = provider.launch(client, image(ec2), subnets, key, group, slaves=1, required=1)
        (described,) = provider.describe(client, [launched["InstanceId"]])
        options = described["MetadataOptions"]
        assert options["HttpTokens"] == "required" and options["HttpPutResponseHopLimit"] == 1
        provider.release(client, "test")
    assert tagged(ec2) == NOTHING


def test_cluster_ssh_uses_the_address_bootstrap_used(tmp_path, tiny_data_dir, moto_url, ec2, hosts, mapped,
                                                     monkeypatch):
    """known_hosts holds the key under the address bootstrap reached; `cluster ssh` must use that one."""
    import shlex
    import subprocess

    config = aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2), slaves=1)
    cluster = Cluster(config)
    try:
        (node,) = cluster.start().nodes
        monkeypatch.setenv("CLUSTER_CONFIG", str(config.source))
        code, out, err = run_cli("ssh", node.instance_id, "--print")
        assert code == 0, err
        command = shlex.split(out.strip())
        address = mapped[node.instance_id].address
        assert command[-1] == f"{SLAVE_USER}@{address}"  # not the public address moto gave the instance
        done = subprocess.run(command[:-1] + ["-o", "BatchMode=yes", command[-1], "hostname"], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == "slave11", done.stderr
    finally:
        cluster.stop()
        cluster.close()


def test_prices_per_zone_beside_on_demand(tmp_path, tiny_data_dir, moto_url, ec2):
    aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2))
    code, out, err = run_cli("--config", str(tmp_path / "cluster.ini"), "prices", "--instance-types",
                             "g4dn.xlarge,g5.xlarge", "--json")
    assert code == 0, err
    rows = json.loads(out)["prices"]
    assert {r["instance_type"] for r in rows} == {"g4dn.xlarge", "g5.xlarge"}
    assert all(r["spot"] is not None and r["zone"].startswith(REGION) for r in rows)
    assert len({r["zone"] for r in rows}) > 1  # one row per availability zone
    assert {r["on_demand"] for r in rows if r["instance_type"] == "g5.xlarge"} == {1.006}
    code, out, err = run_cli("--config", str(tmp_path / "cluster.ini"), "prices")
    assert code == 0 and "g4dn.xlarge" in out


@pytest.mark.parametrize("extra, error, match", [
    ("instance_types = g4dn.nosuch", ConfigError, "instance_types"),
    ("instance_types = not a type", ConfigError, "instance_types"),
    ("max_spot_price = cheap", ConfigError, "max_spot_price"),
    ("region =", ConfigError, "region"),
    ("ssh_from = 0.0.0.0/0", ConfigError, "whole internet"),
    ("ami = auto", ConfigError, "Deep Learning"),
    ("__no_credentials__", CredentialsError, "credentials"),
])
def test_bad_input_fails_clearly_and_creates_nothing(extra, error, match, tmp_path, tiny_data_dir, moto_url, ec2,
                                                     monkeypatch):
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
    existing = ec2.run_instances(ImageId=image(ec2), InstanceType="g4dn.xlarge", MinCount=1, MaxCount=1,
                                 TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                     {"Key": "gpu-cluster:tool", "Value": "gpu-cluster"},
                                     {"Key": "gpu-cluster:cluster", "Value": "test"},
                                     {"Key": "gpu-cluster:owner", "Value": aws.owner()}]}])["Instances"][0]["InstanceId"]
    cluster = Cluster(aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2)))
    with pytest.raises(ClusterStateError, match="already has instances"):
        cluster.start()
    assert tagged(ec2)["instances"] == [existing]
    assert cluster.stop().cluster is None  # no record: `cluster stop` releases them by tag
    assert tagged(ec2) == NOTHING
    cluster.close()


@pytest.mark.parametrize("code, kind, words", [
    ("InsufficientInstanceCapacity", "CapacityError", "no capacity"),
    ("SpotMaxPriceTooLow", "CapacityError", "max_spot_price"),
    ("MaxSpotInstanceCountExceeded", "CapacityError", "quota"),
    ("VcpuLimitExceeded", "CapacityError", "quota"),
    ("UnauthorizedOperation", "CredentialsError", "IAM policy"),
    ("AuthFailure", "CredentialsError", "refused"),
    ("InvalidInstanceType", "ConfigError", "InvalidInstanceType"),
    ("InternalError", "ProviderError", "InternalError"),
])
def test_ec2_errors_are_sorted_into_capacity_credentials_and_the_rest(code, kind, words):
    """The error EC2 would send (botocore's own ClientError), as the error the user sees."""
    from botocore.exceptions import ClientError, NoCredentialsError

    error = aws.classify(ClientError({"Error": {"Code": code, "Message": "from EC2"}}, "RunInstances"), "launching")
    assert type(error).__name__ == kind and words in str(error)
    assert isinstance(aws.classify(NoCredentialsError(), "x"), CredentialsError)


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
        subnets = provider.subnets(client)
        key, _ = provider.key_pair(client)
        group = provider.security_group(client, subnets[0]["VpcId"])
        seen = refuse_spot(client, {"g4dn.xlarge"})
        # g4dn spot refused in every zone: the next type, g5, gets the instances, still spot
        got = provider.launch(client, image(ec2), subnets, key, group, slaves=2, required=2)
        assert {i["InstanceType"] for i in got} == {"g5.xlarge"} and {i["_market"] for i in got} == {"spot"}
        assert len([s for s in seen if s.startswith("spot g4dn")]) == len(subnets) > 1

        refuse_spot(client, {"g5.xlarge"})  # now no spot anywhere: a clear error, nothing launched
        with pytest.raises(CapacityError, match="only 0 of the 2 slaves.*on_demand_fallback"):
            provider.launch(client, image(ec2), subnets, key, group, slaves=2, required=2)
        assert len(tagged(ec2)["instances"]) == 2
        provider.release(client, "test")
        assert tagged(ec2) == NOTHING

    config = aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2), extra="on_demand_fallback = true")
    with Store(config.state_dir) as store:
        provider = aws.AwsProvider(config, store)
        client = provider.ec2()
        refuse_spot(client, {"g4dn.xlarge", "g5.xlarge"})
        subnets = provider.subnets(client)
        key, _ = provider.key_pair(client)
        group = provider.security_group(client, subnets[0]["VpcId"])
        got = provider.launch(client, image(ec2), subnets, key, group, slaves=2, required=2)
        assert {i["_market"] for i in got} == {"on-demand"} and {i["InstanceType"] for i in got} == {"g4dn.xlarge"}
        assert provider.node_of(got[0], image(ec2)).price_per_hour == aws.ON_DEMAND_USD["g4dn.xlarge"]
        provider.release(client, "test")
    assert tagged(ec2) == NOTHING


def test_stop_by_tag_leaves_another_masters_cluster_of_the_same_name_alone(tmp_path, tiny_data_dir, moto_url, ec2):
    """Cluster names repeat ("default"): with the local state lost, stop releases only this master's."""
    theirs = ec2.run_instances(ImageId=image(ec2), InstanceType="g4dn.xlarge", MinCount=1, MaxCount=1,
                               TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                   {"Key": "gpu-cluster:tool", "Value": "gpu-cluster"},
                                   {"Key": "gpu-cluster:cluster", "Value": "test"},
                                   {"Key": "gpu-cluster:owner", "Value": "someone@elsewhere"}]}])["Instances"][0]["InstanceId"]
    cluster = Cluster(aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2)))
    assert not cluster.stop()
    live = [i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
            if i["State"]["Name"] == "running"]
    assert live == [theirs]
    cluster.close()


def test_scale_up_and_down_and_a_spot_notice_gets_a_replacement_instance(tmp_path, tiny_data_dir, moto_url, ec2,
                                                                         hosts, mapped):
    from controller.elastic.keeper import Keeper

    cluster = Cluster(aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2), slaves=1))
    state_of = lambda i: ec2.describe_instances(InstanceIds=[i])["Reservations"][0]["Instances"][0]["State"]["Name"]  # noqa: E731
    try:
        (first,) = [n.instance_id for n in cluster.start().nodes]
        status = cluster.scale(2)  # the same launch path as start: spot, types and zones in order
        (second,) = [n.instance_id for n in status.nodes if n.instance_id != first]
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
    finally:
        cluster.stop()
    assert tagged(ec2) == NOTHING
    assert no_engines(hosts)
    assert wait_until(lambda: not cluster_pids(cluster.config.state_dir), timeout=20)
    cluster.close()

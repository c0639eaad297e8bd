"""The provider contract: what every provider promises, run against local, ssh and aws.

- ``start`` brings up the slaves, ``list`` shows them, ``stop`` releases them, and a second ``stop``
  is a harmless no-op; ``list`` and ``stop`` run on fresh provider objects (nothing is carried
  between verbs but the store, the config and what runs).
- A failure (or Ctrl-C) after any step of ``start`` leaves nothing: no engine, no instance, no
  process on a slave or on the master, and the store says the cluster stopped.
- With the local state gone, ``cluster stop`` still finds and releases what the provider started,
  as far as that provider can (each case says what it cannot, and why).

Everything is real: local engines, the ssh provider against a network-namespace host running
OpenSSH's sshd (tests/netns.py), the aws provider against moto's server over HTTP with that same
host standing in for the instance (``Hooks.address``: moto's instances never boot).  One slave, one
engine thread, no training: the contract is about what runs and what is left, not about learning.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from controller.api import Cluster
from controller.config import Config
from controller.ipp import processes
from controller.ipp.launch import load_cluster
from controller.providers import Hooks, Provider, make_provider, provider_class
from controller.store import ClusterRecord
from tests.aws import NOTHING, aws_config, fresh_ec2, image, tagged
from tests.helpers import cluster_pids, make_config, wait_until
from tests.netns import SLAVE_USER, NetnsHost, NetnsHosts, client_key, unavailable

REASON = unavailable()
KINDS = ("local", "ssh", "aws")
RELEASED = ("stopped", "terminated")
pytestmark = pytest.mark.slow


def failure_steps(kind: str) -> list[str]:
    """The steps of ``kind``'s start to fail after. aws runs the ssh provider's remote steps (controller.
    remote_engines) after its own; the ssh case fails after each of them, and for aws the last one
    (as Ctrl-C) proves that its instances are released from there: each of the others would only repeat
    that at half a minute apiece (the suite's time is kept flat)."""
    steps = list(provider_class(kind).STEPS)
    if kind == "aws":
        shared = set(provider_class("ssh").STEPS)
        steps = [s for s in steps if s not in shared] + steps[-1:]
    return steps


def pytest_generate_tests(metafunc):
    """Every test of the contract once per provider; the failure test once per step of each start."""
    if "world" not in metafunc.fixturenames:
        return
    if "step" in metafunc.fixturenames:
        cases = [(kind, step) for kind in KINDS for step in failure_steps(kind)]
        metafunc.parametrize(("world", "step"), cases, indirect=["world"], ids=[f"{k}-{s}" for k, s in cases])
    else:
        metafunc.parametrize("world", KINDS, indirect=True)


@pytest.fixture(scope="module")
def slave(tmp_path_factory):
    """One namespace host with a real sshd (subnet 31: apart from the other modules'), shared by ssh and aws."""
    if REASON:
        pytest.skip(REASON)
    with NetnsHosts(1, tmp_path_factory.mktemp("netns"), first_subnet=31) as made:
        made.key = client_key(made.workdir)
        yield made.hosts[0], made.key


@pytest.fixture
def ec2_client(moto_url, monkeypatch):
    """A clean moto with test credentials only (never a real account's)."""
    return fresh_ec2(moto_url, monkeypatch)


def stray_processes(host: NetnsHost) -> list[int]:
    """Whatever runs on the slave besides its sshd: engines, nannies, a bootstrap's shell."""
    found = []
    for pid in host.processes():
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if not Path(argv0.decode(errors="replace").split(":")[0]).name.startswith("sshd"):
            found.append(pid)
    return found


@dataclass
class World:
    """One provider with everything it needs to run for real, and the ways to see what it left."""

    kind: str
    config: Config
    host: Optional[NetnsHost] = None
    ec2: Any = None
    address: Optional[Callable[[dict, str], tuple[str, int]]] = None

    def hooks(self, on_step: Callable[[str], None] = lambda step: None) -> Hooks:
        return Hooks(on_step=on_step, address=self.address, waiter_delay=0.2)

    def cluster(self, on_step: Callable[[str], None] = lambda step: None) -> Cluster:
        return Cluster(self.config, provider_hooks=self.hooks(on_step))

    def provider(self, cluster: Cluster) -> Provider:
        """A fresh provider object: nothing of the one that started the cluster carries over."""
        return make_provider(self.kind, self.config, cluster.store, self.hooks())

    def engines_running(self, cluster: Cluster, record: ClusterRecord) -> list[int]:
        if self.host is not None:
            return self.host.engine_processes()
        return [
            e.pid
            for e in cluster.store.engines.of(record.id)
            if processes.is_marked(e.pid, Path(record.profile_dir), record.ipp_cluster_id)
        ]

    def left(self) -> dict:
        """What still runs or exists of the cluster: on the master, on the slave, in EC2."""
        found: dict[str, list] = {"master processes": cluster_pids(self.config.state_dir)}
        if self.host is not None:
            found["slave processes"] = stray_processes(self.host)
        if self.ec2 is not None:
            found.update({k: v for k, v in tagged(self.ec2).items() if v})
            found["private keys"] = list(self.config.state_dir.glob("aws/test/*.pem"))
        return {k: v for k, v in found.items() if v}


@pytest.fixture
def world(request, tmp_path, tiny_data_dir) -> World:
    kind = request.param
    if kind == "local":
        return World(kind, make_config(tmp_path, tiny_data_dir, slaves=1))
    host, key = request.getfixturevalue("slave")
    host.authorized_keys.write_text("")  # each test authorises the key it uses, as cloud-init would
    if kind == "ssh":
        host.authorize(key)
        # known_hosts outside state_dir: with it lost too, stop could not check the slave's host key,
        # and never connects to a host whose key it did not record (test_release_after_the_store_is_lost)
        known = tmp_path / "keep" / "known_hosts"
        known.parent.mkdir()
        return World(
            kind,
            make_config(
                tmp_path,
                tiny_data_dir,
                slaves=1,
                extra=f"""
provider = ssh

[ssh]
hosts = {host.address}
user = {SLAVE_USER}
key_file = {key}
python = {sys.executable}
tunnel = always
known_hosts = {known}
""",
            ),
            host=host,
        )
    ec2 = request.getfixturevalue("ec2_client")
    moto = request.getfixturevalue("moto_url")
    made = World(kind, aws_config(tmp_path, tiny_data_dir, moto, image(ec2), slaves=1), host=host, ec2=ec2)

    authorized: set[str] = set()

    def address(instance: dict, key_file: str) -> tuple[str, int]:
        """Test-only: the instance is the namespace host; its key pair authorised there (cloud-init)."""
        if key_file and key_file not in authorized:  # '' once the state (and the private key) is lost
            host.authorize(key_file)
            authorized.add(key_file)
        return host.address, 22

    made.address = address
    return made


def assert_nothing_left(world: World) -> None:
    assert wait_until(lambda: not world.left(), timeout=30), world.left()


def release_by_hand(world: World, controller_pid: int) -> None:
    """What a provider cannot reach once the state is lost (each test says what and why)."""
    processes.kill_process_group(controller_pid)
    if world.host is not None:
        for pid in world.host.engine_processes():
            processes.kill_process_group(pid)


class TestProviderContract:
    """What every provider promises; each test runs once per provider (``world``)."""

    def test_start_lists_the_slave_stop_releases_it_and_a_second_stop_is_a_no_op(self, world):
        cluster = world.cluster()
        try:
            status = cluster.start()
            assert status.state == "running" and len(status.engines) == 1
            record = cluster.store.clusters.active("test")
            listed = world.provider(cluster).list(record)
            assert [(n.node_id, n.state) for n in listed] == [(n.node_id, "running") for n in status.nodes]
            assert world.engines_running(cluster, record)

            ipp_cluster = load_cluster(Path(record.profile_dir), record.ipp_cluster_id)
            world.provider(cluster).stop(record, ipp_cluster)
            assert wait_until(lambda: not world.engines_running(cluster, record), timeout=20)
            after = [(n.node_id, n.state) for n in world.provider(cluster).list(record)]
            assert [state for _, state in after] in (["stopped"], ["terminated"])

            world.provider(cluster).stop(record, ipp_cluster)  # again: nothing to do, nothing raised
            assert [(n.node_id, n.state) for n in world.provider(cluster).list(record)] == after
        finally:
            cluster.stop()
            cluster.close()
        assert_nothing_left(world)

    def test_a_failure_after_each_start_step_leaves_nothing(self, world, step):
        """The last step fails as Ctrl-C would (KeyboardInterrupt), the others with an error."""
        last = provider_class(world.kind).STEPS[-1]
        error = KeyboardInterrupt if step == last else RuntimeError

        def fail(name: str) -> None:
            if name == step:
                raise error(f"injected failure after {name}")

        cluster = world.cluster(on_step=fail)
        try:
            with pytest.raises(error, match="injected failure"):
                cluster.start()
            record = cluster.store.clusters.latest("test")
            assert record.state == "stopped" and "injected failure" in record.error
            assert all(n.state in RELEASED for n in cluster.store.nodes.of(record.id))
            assert_nothing_left(world)
        finally:
            cluster.stop()
            cluster.close()

    def test_release_after_the_store_is_lost(self, world):
        """state_dir deleted with the slave up: a fresh ``cluster stop`` finds it by the provider's own marks.

        local: the processes' environment markers (profile, cluster id) outlive the store: all found,
        the controller included. ssh: the configured hosts and the run directory named by the cluster;
        found only because known_hosts was kept outside state_dir (an unrecorded host key is never
        trusted). aws: the tags find the instance, group and key pair; the engines on the slave are
        not stopped politely (known_hosts went with state_dir) but end with the terminated instance
        on EC2 - not here, where moto's termination cannot reach the namespace host. ssh and aws
        cannot know the master's own controller, a local process of the lost state_dir.
        """
        cluster = world.cluster()
        try:
            status = cluster.start()
        except BaseException:
            cluster.stop()
            raise
        record = cluster.store.clusters.active("test")
        cluster.close()
        shutil.rmtree(world.config.state_dir)

        fresh = world.cluster()
        try:
            stopped = fresh.stop()
            assert stopped.cluster is None
            if world.kind == "local":
                assert stopped.released and not cluster_pids(world.config.state_dir)
            elif world.kind == "ssh":
                assert stopped.released == [status.nodes[0].node_id]
                assert wait_until(lambda: not world.host.engine_processes(), timeout=20)
            else:
                (instance,) = [n.instance_id for n in status.nodes]
                assert instance in stopped.released and len(stopped.released) == 3  # + security group, key pair
                assert tagged(world.ec2) == NOTHING
        finally:
            fresh.close()
            release_by_hand(world, record.controller_pid)  # also when an assertion failed: no orphan controller
        assert_nothing_left(world)

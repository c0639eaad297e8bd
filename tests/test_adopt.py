"""A restarted master adopts the slaves still up: `cluster start` after the master machine restarted.

The restart is played by SIGKILLing every local process of the cluster (controller, its schedulers, the
keeper, the tunnel holders, the `train` command): what a machine restart leaves is the store, state_dir
and the slaves, whose engines wait for a controller that is gone. Slaves are network-namespace hosts
with a real sshd (tests/netns.py); EC2 is moto's server over HTTP (instances mapped to those hosts by
``Hooks.address``, the one mock: moto's instances never boot). Everything else is real processes.
"""

from __future__ import annotations

import dataclasses
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from controller.api import Cluster
from controller.cli import main
from controller.ipp import processes
from controller.providers import Hooks
from tests.aws import aws_config, fresh_ec2, image
from tests.helpers import make_config, master_restarts, wait_until
from tests.netns import SLAVE_ROOT, SLAVE_USER, NetnsHost, NetnsHosts, client_key, unavailable

REASON = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(REASON), reason=REASON or "ok")]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two slaves (subnet 51: apart from the other modules')."""
    with NetnsHosts(2, tmp_path_factory.mktemp("netns"), first_subnet=51) as made:
        made.key = client_key(made.workdir)
        yield made


@pytest.fixture
def slaves(hosts):
    """The hosts with only the master's user key authorised (aws tests add each cluster's key pair)."""
    for host in hosts.hosts:
        host.authorized_keys.write_text("")
        host.authorize(hosts.key)
    return hosts


def ssh_config(tmp_path: Path, data_dir: Path, slaves, more: str = ""):
    """A 2-slave ssh cluster on the namespace hosts (``more``: further [ssh] keys)."""
    return make_config(
        tmp_path,
        data_dir,
        slaves=2,
        extra=f"""
provider = ssh

[ssh]
hosts = {", ".join(h.address for h in slaves.hosts)}
user = {SLAVE_USER}
key_file = {slaves.key}
python = {sys.executable}
{more}
""",
    )


def engine_pids(hosts) -> dict[str, set[int]]:
    return {h.address: set(h.engine_processes()) for h in hosts.hosts}


def start_cli(config, *flags: str) -> str:
    """`cluster start` in this process; returns what it printed to stderr."""
    err = io.StringIO()
    assert main(["--config", str(config.source), "start", *flags], stdout=io.StringIO(), stderr=err) == 0, (
        err.getvalue()
    )
    return err.getvalue()


HOLD = """
import os, time
import engines.workloads.mnist as _train
_unheld = _train.train_epochs
def _held(spec, checkpoint, n_epochs, *args, **kwargs):
    if checkpoint is not None and not os.path.exists({gate!r}):
        open({reached!r}, "a").close()
        deadline = time.monotonic() + 120
        while not os.path.exists({gate!r}) and time.monotonic() < deadline:
            time.sleep(0.02)
    return _unheld(spec, checkpoint, n_epochs, *args, **kwargs)
_train.train_epochs = _held
"""


def test_ssh_slaves_are_adopted_with_new_engines_and_the_run_resumes(tmp_path, tiny_data_dir, slaves):
    """Two slaves behind SSH tunnels; a run holds its second task (a checkpoint stored) when the master
    restarts. `cluster start` adopts both hosts: their old engines end, new ones register through new
    tunnels, and `train --resume` finishes the run on them."""
    config = ssh_config(tmp_path, tiny_data_dir, slaves, "tunnel = always")
    cluster = Cluster(config)
    train = None
    try:
        first = cluster.start()
        old = engine_pids(slaves)
        assert all(len(pids) >= 1 for pids in old.values())
        # the second task of the run waits on the engine (as the slave sees its home) until the gate opens
        seen = SLAVE_ROOT / "home"
        cluster.client[:].execute(HOLD.format(gate=str(seen / "gate"), reached=str(seen / "held")), block=True)
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
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        homes = [h.dir / "home" for h in slaves.hosts]
        assert (
            wait_until(lambda: any((home / "held").exists() for home in homes) or train.poll() is not None, timeout=120)
            and train.poll() is None
        ), train.stderr.read() if train.poll() else ""
        master_restarts(cluster, train)
        for home in homes:
            (home / "gate").touch()  # the held task ends on its engine; its result has no one to go to
        (run,) = cluster.store.runs.all(limit=1)
        assert run.state == "running" and run.epochs_done == 1

        out = io.StringIO()
        assert main(["--config", str(config.source), "status"], stdout=out, stderr=io.StringIO()) == 0
        said = out.getvalue().replace("\n", " ")
        assert "2 node(s) still up" in said and "run `cluster start` (it adopts them" in said, said
        assert f"`cluster train --resume {run.id}`" in said

        printed = start_cli(config)
        hosts = sorted(h.address for h in slaves.hosts)
        assert f"adopted 2 slave(s) of cluster 'test' still up: {', '.join(hosts)}" in printed, printed

        status = cluster.status()
        assert status.cluster_id == first.cluster_id  # the same record: runs, sweeps and cost stay with it
        assert sorted(n.node_id for n in status.nodes if n.state == "running") == hosts
        assert sorted(e.state for e in status.engines) == ["idle", "idle"]
        assert wait_until(lambda: not any(processes.pid_alive(p) for pids in old.values() for p in pids), timeout=20)
        assert all(h.engine_count() == 1 for h in slaves.hosts)  # no orphan ipengine beside the new one

        resumed = cluster.resume(run.id)
        assert resumed.run.state == "completed" and resumed.run.epochs_done == 3
        assert [e.epoch for e in resumed.epochs] == [1, 2, 3]
    finally:
        if train is not None and train.poll() is None:
            train.kill()
        cluster.stop()
        cluster.close()
    assert wait_until(lambda: not any(h.engine_processes() for h in slaves.hosts), timeout=20)


def test_an_ssh_host_that_died_while_the_master_was_away_is_lost_and_the_other_adopted(tmp_path, tiny_data_dir, slaves):
    """One of two ssh slaves went down with the master (its engines gone, its network unreachable). `cluster
    start` adopts the other and records that one lost; the add that would make up `--slaves 2` has only the
    dead host, which it does not try again so soon: it fails at once, and the adopted slave serves on (the
    keeper, where one runs, tries again later)."""
    config = ssh_config(tmp_path, tiny_data_dir, slaves)
    cluster = Cluster(config)
    alive, dead = slaves.hosts
    try:
        cluster.start()
        master_restarts(cluster)
        for pid in dead.engine_processes():
            processes.kill_process_group(pid)
        subprocess.run(["ip", "link", "set", dead.veth, "down"], check=True)  # the master's way to it is gone

        printed = start_cli(config)
        assert (
            f"adopted 1 slave(s) of cluster 'test' still up: {alive.address}; lost {dead.address}; "
            f"adding 1 slave(s) for those lost failed"
        ) in printed, printed
        # the add did not wait a second time for the host the adoption had just found unreachable
        assert re.search(
            rf"{re.escape(dead.address)} was lost \d+ s ago, unreachable \(tried again 120 s after\)", printed
        ), printed
        status = cluster.status()
        assert {n.node_id: n.state for n in status.nodes if n.node_id == dead.address} == {dead.address: "lost"}
        assert [e.state for e in status.engines] == ["idle"] and alive.engine_count() == 1
        assert cluster.train(epochs=1, subset=200).run.state == "completed"
    finally:
        subprocess.run(["ip", "link", "set", dead.veth, "up"], check=False)
        cluster.stop()
        cluster.close()
    assert wait_until(lambda: not any(h.engine_processes() for h in slaves.hosts), timeout=20)


# aws -----------------------------------------------------------------------------------------------
@pytest.fixture
def ec2(moto_url, monkeypatch):
    """A clean moto, test credentials only (``mapped`` maps every Cluster's instances to the namespace hosts)."""
    return fresh_ec2(moto_url, monkeypatch)


@pytest.fixture
def mapped(slaves, monkeypatch):
    """Test-only: instance -> the first namespace host no live instance holds; its key pair authorised there
    (cloud-init). A test frees a host by deleting the instance it played."""
    assigned: dict[str, NetnsHost] = {}

    def address(instance: dict, key_file: str) -> tuple[str, int]:
        if instance["InstanceId"] not in assigned:
            free = [h for h in slaves.hosts if h not in assigned.values()]
            assert free, "no namespace host left for a new instance"
            free[0].authorize(key_file)
            assigned[instance["InstanceId"]] = free[0]
        return assigned[instance["InstanceId"]].address, 22

    defaults = Cluster.__init__.__kwdefaults__
    monkeypatch.setitem(defaults, "provider_hooks", Hooks(address=address, waiter_delay=0.2))
    return assigned


def every_instance(ec2) -> dict[str, str]:
    """Every instance moto knows, terminated ones included: id -> state (one RunInstances, one more id)."""
    return {
        i["InstanceId"]: i["State"]["Name"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
    }


def aws_cluster(tmp_path, tiny_data_dir, moto_url, ec2, slaves: int) -> Cluster:
    return Cluster(aws_config(tmp_path, tiny_data_dir, moto_url, image(ec2), slaves=slaves))


def test_aws_instances_are_adopted_without_launching_or_terminating_any_and_ctrl_c_releases_them(
    tmp_path, tiny_data_dir, moto_url, ec2, slaves, mapped
):
    cluster = aws_cluster(tmp_path, tiny_data_dir, moto_url, ec2, slaves=1)
    try:
        cluster.start()
        before = every_instance(ec2)
        old = engine_pids(slaves)
        master_restarts(cluster)

        printed = start_cli(cluster.config)
        assert every_instance(ec2) == before  # the same instance, still running; none launched
        assert f"adopted 1 slave(s) of cluster 'test' still up: {next(iter(before))}" in printed, printed
        assert wait_until(lambda: not any(processes.pid_alive(p) for pids in old.values() for p in pids), timeout=20)
        run = cluster.train(subset=200, epochs=1)  # the new engine serves
        assert run.run.state == "completed" and run.run.host == mapped[next(iter(before))].hostname

        # the master restarts again, and this time the adopting start is interrupted (Ctrl-C) once the
        # node has its new engine: like an interrupted start, it releases everything
        master_restarts(cluster)
        record = cluster.store.clusters.active("test")

        def interrupt(step: str) -> None:
            if step == "adopt":
                raise KeyboardInterrupt

        hooks = dataclasses.replace(Cluster.__init__.__kwdefaults__["provider_hooks"], on_step=interrupt)
        with Cluster(cluster.config, provider_hooks=hooks) as interrupted, pytest.raises(KeyboardInterrupt):
            interrupted.start()
        assert cluster.store.clusters.get(record.id).state == "stopped"
        assert set(every_instance(ec2).values()) == {"terminated"}
        assert not processes.marked_processes(Path(record.profile_dir))
        assert wait_until(lambda: not any(h.engine_processes() for h in slaves.hosts), timeout=20)
    finally:
        cluster.stop()
        cluster.close()
    assert set(every_instance(ec2).values()) == {"terminated"}


def test_an_instance_that_died_while_the_master_was_away_is_lost_and_replaced(
    tmp_path, tiny_data_dir, moto_url, ec2, slaves, mapped
):
    """Spot capacity taken back during the restart: that instance is recorded lost, the other adopted, and
    `add` launches one instance to make up `--slaves 2`."""
    cluster = aws_cluster(tmp_path, tiny_data_dir, moto_url, ec2, slaves=2)
    try:
        cluster.start()
        master_restarts(cluster)
        dead, survivor = sorted(mapped)
        ec2.terminate_instances(InstanceIds=[dead])
        host = mapped.pop(dead)  # the machine is gone with its engines; its namespace may play the new one
        for pid in host.engine_processes():
            processes.kill_process_group(pid)

        printed = start_cli(cluster.config)
        after = every_instance(ec2)
        (new,) = set(after) - {dead, survivor}
        assert after == {dead: "terminated", survivor: "running", new: "running"}
        assert f"adopted 1 slave(s) of cluster 'test' still up: {survivor}; lost {dead}; added {new}" in printed, (
            printed
        )
        states = {n.node_id: n.state for n in cluster.store.nodes.of(cluster.store.clusters.active("test").id)}
        assert states == {dead: "lost", survivor: "running", new: "running"}
        status = cluster.status()
        assert sorted(e.state for e in status.engines) == ["idle", "idle"] and status.target == 2
    finally:
        cluster.stop()
        cluster.close()
    assert set(every_instance(ec2).values()) == {"terminated"}


def test_fresh_releases_the_old_instances_and_starts_new_ones(tmp_path, tiny_data_dir, moto_url, ec2, slaves, mapped):
    cluster = aws_cluster(tmp_path, tiny_data_dir, moto_url, ec2, slaves=1)
    try:
        first = cluster.start()
        (old,) = every_instance(ec2)
        master_restarts(cluster)

        printed = start_cli(cluster.config, "--fresh")
        assert "adopted" not in printed
        after = every_instance(ec2)
        (new,) = set(after) - {old}
        assert after == {old: "terminated", new: "running"}
        status = cluster.status()
        assert status.cluster_id != first.cluster_id and [e.state for e in status.engines] == ["idle"]
        assert cluster.store.clusters.get(first.cluster_id).state == "stopped"
    finally:
        cluster.stop()
        cluster.close()
    assert set(every_instance(ec2).values()) == {"terminated"}

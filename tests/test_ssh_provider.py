"""provider = ssh against real sshd's in network namespaces: paramiko, SFTP, engines across veths, tunnels.

Nothing is mocked: the slaves are namespaces with their own addresses and
hostnames, each running Debian's OpenSSH server; engines start over SSH and
register with the real controller across 10.213.x.0/24, and a real training
run executes on one of them.
"""
from __future__ import annotations

import json
import socket
import stat
import sys
from pathlib import Path

import pytest

from controller.api import Cluster
from controller.errors import ProviderError
from tests.conftest import cluster_pids, make_config, wait_until
from tests.netns import SLAVE_USER, NetnsHosts, client_key, unavailable

REASON = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(REASON), reason=REASON or "ok")]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with NetnsHosts(2, tmp_path_factory.mktemp("netns"), first_subnet=1) as made:
        key = client_key(made.workdir)
        for host in made.hosts:
            host.authorize(key)
        made.key = key
        yield made


def ssh_config(tmp_path, data_dir, hosts, *, slaves=2, tunnel="never", known_hosts=""):
    addresses = ", ".join(h.address for h in hosts.hosts[:slaves])
    return make_config(tmp_path, data_dir, slaves=slaves, extra=f"""
provider = ssh

[ssh]
hosts = {addresses}
user = {SLAVE_USER}
key_file = {hosts.key}
python = {sys.executable}
tunnel = {tunnel}
{f'known_hosts = {known_hosts}' if known_hosts else ''}
""")


def engine_files(host) -> list[Path]:
    # the run directory is named by the cluster and the master's host: two masters' "test" stay apart
    return list((host.dir / "home").glob(f".cluster-engine/run/test.{socket.gethostname()}/engine.json"))


def test_two_slaves_register_train_and_stop(tmp_path, tiny_data_dir, hosts):
    cluster = Cluster(ssh_config(tmp_path, tiny_data_dir, hosts))
    try:
        status = cluster.start()
        assert status.state == "running"
        assert sorted(e.host for e in status.engines) == ["slave1", "slave2"]  # each from its own namespace
        assert {n.node_id for n in status.nodes} == {"10.213.1.2", "10.213.2.2"}
        assert all(e.node_id for e in status.engines)
        for host in hosts.hosts:
            assert host.engine_count() == 1
            # the connection file (HMAC key) landed 0600 in a 0700 directory, and never in a log
            (conn,) = engine_files(host)
            assert stat.S_IMODE(conn.stat().st_mode) == 0o600
            assert stat.S_IMODE(conn.parent.stat().st_mode) == 0o700
        key = json.loads(engine_files(hosts.hosts[0])[0].read_text())["key"]
        for log in (hosts.hosts[0].dir / "home").rglob("*.log"):
            assert key not in log.read_text(errors="replace")
        # host keys were recorded on first contact
        known = (cluster.config.state_dir / "known_hosts").read_text()
        assert "10.213.1.2" in known and "10.213.2.2" in known
        assert stat.S_IMODE((cluster.config.state_dir / "known_hosts").stat().st_mode) == 0o600

        run = cluster.train(subset=200, epochs=1)
        assert run.run.state == "completed"
        assert run.run.host in ("slave1", "slave2")
        target = cluster.provider().ssh_target(status.nodes[0])
        assert "StrictHostKeyChecking=yes" in target.command()
    finally:
        cluster.stop()
    assert wait_until(lambda: not any(h.engine_processes() for h in hosts.hosts), timeout=20)
    assert not any(engine_files(h) for h in hosts.hosts)  # run dirs (and the HMAC key) removed
    assert cluster.stop().cluster is None  # safe twice
    assert wait_until(lambda: not cluster_pids(cluster.config.state_dir), timeout=10)
    cluster.close()


def test_changed_host_key_is_refused(tmp_path, tiny_data_dir, hosts):
    known = tmp_path / "known_hosts"
    # a recorded key that is not the host's: as after a man-in-the-middle or a reinstall
    other = hosts.hosts[1].host_key_line().split()
    known.write_text(f"{hosts.hosts[0].address} {other[0]} {other[1]}\n")
    cluster = Cluster(ssh_config(tmp_path, tiny_data_dir, hosts, slaves=1, known_hosts=str(known)))
    with pytest.raises(ProviderError, match="host key changed"):
        cluster.start()
    assert cluster.status().state in ("stopped", "none")
    assert not hosts.hosts[0].engine_processes()
    cluster.close()


def test_reverse_tunnels_and_lost_state(tmp_path, tiny_data_dir, hosts):
    """tunnel = always: the controller listens on loopback only; engines come back through SSH."""
    known = tmp_path / "keep" / "known_hosts"  # outside state_dir: survives the lost state below
    known.parent.mkdir()
    config = ssh_config(tmp_path, tiny_data_dir, hosts, slaves=1, tunnel="always", known_hosts=str(known))
    cluster = Cluster(config)
    try:
        status = cluster.start()
        assert [e.host for e in status.engines] == ["slave1"]
        import json

        url = json.loads(Path(status.url_file).read_text())
        assert url["interface"] == "tcp://127.0.0.1"  # nothing listens beyond loopback
        conn = json.loads(engine_files(hosts.hosts[0])[0].read_text())
        assert conn["interface"] == "tcp://127.0.0.1"
        assert cluster.train(subset=100, epochs=1).run.state == "completed"
    except BaseException:
        cluster.stop()
        raise
    # the local state is lost; the engines still run on the slave
    controller_pid = cluster.store.clusters.active("test").controller_pid
    cluster.close()
    import shutil

    shutil.rmtree(config.state_dir)
    assert hosts.hosts[0].engine_processes()
    fresh = Cluster(config)
    stopped = fresh.stop()
    assert stopped.cluster is None
    assert stopped.released == ["10.213.1.2"]
    assert wait_until(lambda: not hosts.hosts[0].engine_processes(), timeout=20)
    fresh.close()
    # the master's own controller was orphaned with the state too; not the provider's to find
    from controller import processes

    processes.kill_process_group(controller_pid)


def test_stop_ends_engines_by_the_stored_pids_after_the_master_was_renamed(tmp_path, tiny_data_dir, hosts,
                                                                           monkeypatch):
    """The run dir on the slave is named by the master's hostname: after a rename only the pids find them."""
    import os

    host = hosts.hosts[0]
    cluster = Cluster(ssh_config(tmp_path, tiny_data_dir, hosts, slaves=1))
    try:
        status = cluster.start()
        assert host.engine_count() == 1
        # a pid the store holds that now belongs to another program (here the slave's sshd): left alone
        sshd = next(p for p in host.processes() if b"sshd" in Path(f"/proc/{p}/cmdline").read_bytes())
        remote_dir = cluster.store.execute("SELECT remote_dir FROM remote_engines").fetchone()[0]
        cluster.store.execute("INSERT INTO remote_engines VALUES (?, ?, ?, ?)",
                              (status.cluster_id, host.address, sshd, remote_dir))
        monkeypatch.setattr(socket, "gethostname", lambda: "renamed-master")
        cluster.stop()
        monkeypatch.undo()
        assert wait_until(lambda: not host.engine_processes(), timeout=20)
        assert sshd in host.processes()
    finally:
        monkeypatch.undo()
        for pid in host.engine_processes():  # whatever the stop under test left behind
            os.kill(pid, 9)
        cluster.stop()
        cluster.close()


def test_a_slave_sees_none_of_the_masters_paths_and_is_not_root(tmp_path, tiny_data_dir, hosts):
    """The namespace slaves are honest: another user, and the master's checkout, home, state_dir and
    data_dir do not exist there; only the Python environment is."""
    from controller.remote import Host, Remote
    from tests.netns import REPO, hidden_dirs, python_environment

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    host = Host(hosts.hosts[0].address, user=SLAVE_USER, key_file=str(hosts.key))
    with Remote.connect(host, tmp_path / "known_hosts") as remote:
        assert remote.run("id -un")[1].strip() == SLAVE_USER
        for path in (REPO / "controller", state_dir, tiny_data_dir):
            status, _, _ = remote.run(f"test -e {path}/. && ls -A {path} | grep -q .", check=False)
            assert status != 0, f"{path} is visible on the slave"
        # of the master's home, only the way to the Python environment (a pyenv interpreter, say)
        home = Path.home().resolve()
        allowed = {p.relative_to(home).parts[0] for p in python_environment(hidden_dirs()) if p.is_relative_to(home)}
        assert set(remote.run(f"ls -A {home}", check=False)[1].split()) <= allowed
        assert remote.run(f"{sys.executable} -c 'import torch, ipyparallel'", check=False)[0] == 0


def test_slaves_train_from_their_own_data_dir_filled_from_the_master_with_no_master_path(
        tmp_path, tiny_data_dir, hosts):
    import hashlib
    import json

    cluster = Cluster(ssh_config(tmp_path, tiny_data_dir, hosts, slaves=1))
    try:
        cluster.start()
        raw = hosts.hosts[0].dir / "home" / ".cache" / "cluster" / "data" / "MNIST" / "raw"
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
            master = (tiny_data_dir / "MNIST" / "raw" / name).read_bytes()
            assert hashlib.sha256((raw / name).read_bytes()).digest() == hashlib.sha256(master).digest()
        run = cluster.train(subset=100, epochs=1)
        assert run.run.state == "completed" and run.run.params["data_dir"] == "~/.cache/cluster/data"
        # nothing the slave received names a path of the master
        received = engine_files(hosts.hosts[0])[0].read_text() + json.dumps(run.run.params)
        for path in (tiny_data_dir, cluster.config.state_dir, Path(__file__).resolve().parent.parent):
            assert str(path) not in received
    finally:
        cluster.stop()
        cluster.close()


def test_a_command_filling_stderr_does_not_block_remote_run(tmp_path, hosts):
    from controller.remote import Host, Remote

    host = Host(hosts.hosts[0].address, user=SLAVE_USER, key_file=str(hosts.key))
    with Remote.connect(host, tmp_path / "known_hosts") as remote:
        # 4 MB on stderr before anything on stdout: more than the channel's window
        status, out, err = remote.run("head -c 4000000 /dev/zero | tr '\\0' x >&2; echo done", timeout=30)
    assert status == 0 and out.strip() == "done" and len(err) == 4_000_000


def test_scale_takes_unused_hosts_and_remove_drains_one(tmp_path, tiny_data_dir, hosts):
    addresses = ", ".join(h.address for h in hosts.hosts)
    cluster = Cluster(make_config(tmp_path, tiny_data_dir, slaves=1, extra=f"""
provider = ssh

[ssh]
hosts = {addresses}
user = {SLAVE_USER}
key_file = {hosts.key}
python = {sys.executable}
"""))
    first, second = (h.address for h in hosts.hosts)
    try:
        status = cluster.start()
        assert [n.node_id for n in status.nodes] == [first] and not hosts.hosts[1].engine_processes()
        status = cluster.scale(2)  # the next unused host of [ssh] hosts
        assert {n.node_id: n.state for n in status.nodes} == {first: "running", second: "running"}
        assert sorted(e.host for e in status.engines if e.state == "idle") == ["slave1", "slave2"]
        with pytest.raises(ProviderError, match=r"no unused host left in \[ssh\] hosts for 1 more slave\(s\): 0 free of 2"):
            cluster.scale(3)
        assert cluster.status().target == 2  # a failed scale leaves the target as it was

        status = cluster.remove([first])  # drained (idle here), its engines stopped, the other goes on
        assert {n.node_id: n.state for n in status.nodes} == {first: "stopped", second: "running"}
        assert wait_until(lambda: not hosts.hosts[0].engine_processes(), timeout=20)
        assert [e.host for e in status.engines if e.state == "idle"] == ["slave2"]
        assert cluster.train(subset=100, epochs=1).run.host == "slave2"
    finally:
        cluster.stop()
    assert wait_until(lambda: not any(h.engine_processes() for h in hosts.hosts), timeout=20)
    assert wait_until(lambda: not cluster_pids(cluster.config.state_dir), timeout=10)
    cluster.close()

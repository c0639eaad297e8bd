"""provider = ssh against real sshd's in network namespaces: paramiko, SFTP, engines across veths, tunnels.

What every provider promises (start, list, stop twice, a failure after each start step, release after
the store is lost) is in test_provider_contract.py; here what is ssh's own.

Nothing is mocked: the slaves are namespaces with their own addresses and
hostnames, each running Debian's OpenSSH server; engines start over SSH and
register with the real controller across 10.213.x.0/24, and a real training
run executes on one of them.
"""

from __future__ import annotations

import contextlib
import json
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from controller.api import Cluster
from controller.errors import ProviderError
from controller.providers.base import SshTarget
from controller.providers.remote.bootstrap import STAMP, EngineSpec, bootstrap, engines_digest, stamped
from controller.providers.remote.transport import SshConnection
from tests.helpers import cluster_pids, make_config, master_restarts, wait_until
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


def ssh_config(tmp_path, data_dir, hosts, *, slaves=2, listed=0, tunnel="never", known_hosts=""):
    """[ssh] hosts names the first ``listed`` namespace hosts (default: as many as ``slaves``)."""
    addresses = ", ".join(h.address for h in hosts.hosts[: listed or slaves])
    return make_config(
        tmp_path,
        data_dir,
        slaves=slaves,
        extra=f"""
provider = ssh

[ssh]
hosts = {addresses}
user = {SLAVE_USER}
key_file = {hosts.key}
python = {sys.executable}
tunnel = {tunnel}
{f"known_hosts = {known_hosts}" if known_hosts else ""}
""",
    )


def engine_files(host) -> list[Path]:
    # the run directory is named by the cluster and the master's host: two masters' "test" stay apart
    return list((host.dir / "home").glob(f".cluster-engine/run/test.{socket.gethostname()}/engine.json"))


@contextlib.contextmanager
def program_of_the_slave_user():
    """The pid of a program of the slave's user that is not an engine, as a pid file or the store may name it once
    the pid was reused: the stop script could signal it (same user), so only its command-line check spares it."""
    program = subprocess.Popen(
        ["setpriv", f"--reuid={SLAVE_USER}", f"--regid={SLAVE_USER}", "--clear-groups", "sleep", "600"]
    )
    try:
        yield program
    finally:
        program.kill()
        program.wait()


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


def test_one_machine_under_two_names_is_refused_before_any_engine_starts(tmp_path, tiny_data_dir, hosts):
    """Its address and a second name (here its second address): both bootstraps would use one run dir, and
    the second would stop the engines the first had started. The other slave, a machine of its own with the
    same boot id (one kernel), is not mistaken for it."""
    one, other = hosts.hosts
    config = make_config(
        tmp_path,
        tiny_data_dir,
        slaves=3,
        extra=f"""
provider = ssh

[ssh]
hosts = {one.address}, {other.address}, {one.alias}
user = {SLAVE_USER}
key_file = {hosts.key}
python = {sys.executable}
""",
    )
    cluster = Cluster(config)
    with pytest.raises(
        ProviderError,
        match=rf"{one.address} and {one.alias} are one machine \({one.hostname}, "
        r"boot id [0-9a-f-]+\): list it once in \[ssh\] hosts",
    ):
        cluster.start()
    assert cluster.status().state in ("stopped", "none")
    assert not one.engine_processes() and not other.engine_processes()
    assert not cluster_pids(config.state_dir)
    cluster.close()


def test_stop_ends_engines_by_the_stored_pids_after_the_master_was_renamed(tmp_path, tiny_data_dir, hosts, monkeypatch):
    """The run dir on the slave is named by the master's hostname: after a rename only the pids find them."""
    import os

    host = hosts.hosts[0]
    cluster = Cluster(ssh_config(tmp_path, tiny_data_dir, hosts, slaves=1))
    stack = contextlib.ExitStack()
    try:
        status = cluster.start()
        assert host.engine_count() == 1
        # a pid the store holds that now belongs to another program of the slave's user: left alone
        reused = stack.enter_context(program_of_the_slave_user())
        remote_dir = cluster.store.execute("SELECT remote_dir FROM remote_engines").fetchone()[0]
        cluster.store.execute(
            "INSERT INTO remote_engines VALUES (?, ?, ?, ?)", (status.cluster_id, host.address, reused.pid, remote_dir)
        )
        monkeypatch.setattr(socket, "gethostname", lambda: "renamed-master")
        cluster.stop()
        monkeypatch.undo()
        assert wait_until(lambda: not host.engine_processes(), timeout=20)
        assert reused.poll() is None, "the program under a reused pid was signalled"
    finally:
        monkeypatch.undo()
        for pid in host.engine_processes():  # whatever the stop under test left behind
            os.kill(pid, 9)
        cluster.stop()
        cluster.close()
        stack.close()


def test_a_master_that_lost_its_state_dir_stops_the_engine_its_earlier_start_left_before_starting_one(
    tmp_path, tiny_data_dir, hosts, caplog
):
    """Its old engine would wait for the dead controller for master_grace_minutes, holding the slave's GPU
    beside the new one. A pid file naming another program (a pid reused since) leaves that program alone.
    The second start finds the code the first verified there (its stamp): no upload, no import check."""
    import logging
    import os
    import shutil

    host = hosts.hosts[0]
    (tmp_path / "lost").mkdir()
    (tmp_path / "new").mkdir()
    before = Cluster(ssh_config(tmp_path / "lost", tiny_data_dir, hosts, slaves=1))
    after = Cluster(ssh_config(tmp_path / "new", tiny_data_dir, hosts, slaves=1))
    # the slave as an earlier bootstrap left it, then lost its copy of the engine code: bootstrapped in full
    remote_dir = host.dir / "home" / ".cluster-engine"
    remote_dir.mkdir(exist_ok=True)
    shutil.chown(remote_dir, SLAVE_USER, SLAVE_USER)
    shutil.rmtree(remote_dir / "src" / "engines", ignore_errors=True)
    stamp = remote_dir / "engines.stamp"
    stamp.write_text(json.dumps({"sources": engines_digest(), "python": sys.executable, "torch": "?", "gpus": 0}))
    shutil.chown(stamp, SLAVE_USER, SLAVE_USER)
    stack = contextlib.ExitStack()
    try:
        with caplog.at_level(logging.INFO, logger="controller.providers.remote"):
            before.start()
        assert "engines missing since the last bootstrap" in caplog.text
        assert json.loads(stamp.read_text())["torch"] == torch.__version__
        [left_behind] = host.engine_pids()
        master_restarts(before)  # and its state dir is never seen again
        reused = stack.enter_context(program_of_the_slave_user())
        [run_dir] = [f.parent for f in engine_files(host)]
        (run_dir / "engine-7.pid").write_text(f"{reused.pid}\n")
        caplog.clear()

        with caplog.at_level(logging.INFO, logger="controller.providers.remote"):
            status = after.start()

        assert "engine code and python as verified by an earlier bootstrap" in caplog.text
        assert f"stopped 1 engine(s) an earlier start of this cluster left running (pids {left_behind})" in caplog.text
        assert left_behind not in host.processes()
        assert reused.poll() is None, "the program under a reused pid was signalled"
        [engine] = status.engines
        assert engine.state == "idle" and host.engine_pids() == [engine.pid]
    finally:
        for pid in host.engine_processes():  # whatever the start under test left behind
            os.kill(pid, 9)
        after.stop()
        before.stop()  # its controller, when the test failed before the restart
        after.close()
        before.close()
        stack.close()


def test_a_second_cluster_of_the_same_name_from_another_state_dir_is_refused_and_the_first_serves_on(
    tmp_path, tiny_data_dir, hosts
):
    """Two checkouts on one master, both with the default cluster name, name the same slave: they share its run
    dir. The engines there are the first cluster's, still working, not leftovers: the second start stops
    nothing, says whose they are and what to do, and leaves nothing of its own behind."""
    import os

    host = hosts.hosts[0]
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = Cluster(ssh_config(tmp_path / "first", tiny_data_dir, hosts, slaves=1))
    second = Cluster(ssh_config(tmp_path / "second", tiny_data_dir, hosts, slaves=1))
    try:
        first.start()
        [engine] = host.engine_pids()
        controller = first.store.clusters.active("test").controller_pid

        with pytest.raises(ProviderError) as refused:
            second.start()

        assert (
            f"holds the engines of another cluster of this master that is still running (its controller, "
            f"pid {controller}" in str(refused.value)
        )
        assert "give this one another [cluster] name" in str(refused.value)
        assert host.engine_pids() == [engine]
        assert second.status().state in ("stopped", "none") and not cluster_pids(second.config.state_dir)
        assert first.train(subset=200, epochs=1).run.state == "completed"
    finally:
        for pid in host.engine_processes():
            os.kill(pid, 9)
        second.stop()
        first.stop()
        second.close()
        first.close()


def test_a_stamp_whose_gpu_count_the_slave_no_longer_shows_means_a_full_bootstrap(tmp_path, hosts, caplog):
    """A GPU gone (or added) since the last bootstrap: the engines would be pinned to devices torch does not
    see. The slave's device files are counted at every start; a count unlike the stamp's is verified again."""
    import logging

    spec = EngineSpec(tag="stamp-test", connection={}, python=sys.executable, remote_dir="~/.cluster-engine-stamp")
    host = SshTarget(hosts.hosts[1].address, user=SLAVE_USER, key_file=str(hosts.key))
    with SshConnection.connect(host, tmp_path / "known_hosts") as remote:
        base, stamp = bootstrap(remote, spec)
        assert stamp["gpus"] == 0 and stamped(remote, spec) == (base, stamp)
        remote.put(json.dumps({**stamp, "gpus": 1}).encode(), f"{base}/{STAMP}", mode=0o600)
        with caplog.at_level(logging.INFO, logger="controller.providers.remote.bootstrap"):
            assert stamped(remote, spec) is None
        remote.run(f"rm -rf {base}")
    assert "0 GPU device(s) where the last bootstrap counted 1" in caplog.text


def test_a_slave_sees_none_of_the_masters_paths_and_is_not_root(tmp_path, tiny_data_dir, hosts):
    """The namespace slaves are honest: another user, and the master's checkout, home, state_dir and
    data_dir do not exist there; only the Python environment is."""
    from controller.providers.base import SshTarget
    from controller.providers.remote.transport import SshConnection
    from tests.netns import REPO, hidden_dirs, python_environment

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    host = SshTarget(hosts.hosts[0].address, user=SLAVE_USER, key_file=str(hosts.key))
    with SshConnection.connect(host, tmp_path / "known_hosts") as remote:
        assert remote.run("id -un")[1].strip() == SLAVE_USER
        for path in (REPO / "controller", state_dir, tiny_data_dir):
            status, _, _ = remote.run(f"test -e {path}/. && ls -A {path} | grep -q .", check=False)
            assert status != 0, f"{path} is visible on the slave"
        # of the master's home, only the way to the Python environment (a pyenv interpreter, say)
        home = Path.home().resolve()
        allowed = {p.relative_to(home).parts[0] for p in python_environment(hidden_dirs()) if p.is_relative_to(home)}
        assert set(remote.run(f"ls -A {home}", check=False)[1].split()) <= allowed
        assert remote.run(f"{sys.executable} -c 'import torch, ipyparallel'", check=False)[0] == 0


def test_a_command_filling_stderr_does_not_block_remote_run(tmp_path, hosts):
    from controller.providers.base import SshTarget
    from controller.providers.remote.transport import SshConnection

    host = SshTarget(hosts.hosts[0].address, user=SLAVE_USER, key_file=str(hosts.key))
    with SshConnection.connect(host, tmp_path / "known_hosts") as remote:
        # 4 MB on stderr before anything on stdout: more than the channel's window
        status, out, err = remote.run("head -c 4000000 /dev/zero | tr '\\0' x >&2; echo done", timeout=30)
    assert status == 0 and out.strip() == "done" and len(err) == 4_000_000


@pytest.fixture(scope="class")
def one_of_two(tmp_path_factory, tiny_data_dir, hosts):
    """A 1-slave cluster whose [ssh] hosts lists both namespace hosts (the second unused), for a class."""
    cluster = Cluster(
        ssh_config(tmp_path_factory.mktemp("ssh"), tiny_data_dir, hosts, slaves=1, listed=len(hosts.hosts))
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        cluster.close()


class TestASlaveOfTwoHosts:
    """One start for the class (it costs more than the checks on it together); each test asserts one
    property; the last two change the cluster (scale and remove, then stop)."""

    def test_trains_from_its_own_data_dir_filled_from_the_master_and_keeps_the_key_private(
        self, one_of_two, tiny_data_dir, hosts
    ):
        """No path of the master reaches the slave; the connection file (the controller's HMAC key) lands
        0600 in a 0700 directory, never in a log; host keys are recorded 0600."""
        import hashlib

        cluster = one_of_two
        status = cluster.status()
        assert [e.host for e in status.engines] == ["slave1"] and all(e.node_id for e in status.engines)
        (conn,) = engine_files(hosts.hosts[0])
        assert stat.S_IMODE(conn.stat().st_mode) == 0o600
        assert stat.S_IMODE(conn.parent.stat().st_mode) == 0o700
        key = json.loads(conn.read_text())["key"]
        for log in (hosts.hosts[0].dir / "home").rglob("*.log"):
            assert key not in log.read_text(errors="replace")
        known = cluster.config.state_dir / "known_hosts"
        assert hosts.hosts[0].address in known.read_text() and stat.S_IMODE(known.stat().st_mode) == 0o600
        assert "StrictHostKeyChecking=yes" in cluster.provider().ssh_target(status.nodes[0]).command()
        raw = hosts.hosts[0].dir / "home" / ".cache" / "cluster" / "data" / "MNIST" / "raw"
        for name in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ):
            master = (tiny_data_dir / "MNIST" / "raw" / name).read_bytes()
            assert hashlib.sha256((raw / name).read_bytes()).digest() == hashlib.sha256(master).digest()
        run = cluster.train(subset=100, epochs=1)
        assert run.run.state == "completed" and run.run.params["data_dir"] == "~/.cache/cluster/data"
        # nothing the slave received names a path of the master
        received = engine_files(hosts.hosts[0])[0].read_text() + json.dumps(run.run.params)
        for path in (tiny_data_dir, cluster.config.state_dir, Path(__file__).resolve().parent.parent):
            assert str(path) not in received

    def test_scale_takes_unused_hosts_and_remove_drains_one(self, one_of_two, hosts):
        cluster = one_of_two
        first, second = (h.address for h in hosts.hosts)
        status = cluster.status()
        assert [n.node_id for n in status.nodes] == [first] and not hosts.hosts[1].engine_processes()
        status = cluster.scale(2)  # the next unused host of [ssh] hosts
        assert {n.node_id: n.state for n in status.nodes} == {first: "running", second: "running"}
        assert sorted(e.host for e in status.engines if e.state == "idle") == ["slave1", "slave2"]
        with pytest.raises(
            ProviderError, match=r"no unused host left in \[ssh\] hosts for 1 more slave\(s\): 0 free of 2"
        ):
            cluster.scale(3)
        assert cluster.status().target == 2  # a failed scale leaves the target as it was

        status = cluster.remove([first])  # drained (idle here), its engines stopped, the other goes on
        assert {n.node_id: n.state for n in status.nodes} == {first: "stopped", second: "running"}
        assert wait_until(lambda: not hosts.hosts[0].engine_processes(), timeout=20)
        assert [e.host for e in status.engines if e.state == "idle"] == ["slave2"]
        assert cluster.train(subset=100, epochs=1).run.host == "slave2"

    def test_stop_ends_every_engine_and_removes_the_run_dir_with_the_key(self, one_of_two, hosts):
        cluster = one_of_two
        cluster.stop()
        assert wait_until(lambda: not any(h.engine_processes() for h in hosts.hosts), timeout=20)
        assert not any(engine_files(h) for h in hosts.hosts)  # the run dir (and the HMAC key) removed
        assert wait_until(lambda: not cluster_pids(cluster.config.state_dir), timeout=10)

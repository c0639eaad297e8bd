"""The SSH tunnel holder is one of the cluster's processes: `cluster stop` ends it whatever happened to start.

The master is killed (SIGKILL, in a child process) at the worst moment: the holder runs, its pid file
is not written yet.  The holder is then paused (SIGSTOP), so it cannot notice on its own that nobody
needs it; only the cluster's process marker lets `stop` find it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from controller.api import Cluster
from controller.ipp import processes
from controller.ipp.profile import profile_dir
from tests.helpers import REPO, cluster_pids, make_config, wait_until
from tests.netns import SLAVE_USER, NetnsHosts, client_key, unavailable

REASON = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(REASON), reason=REASON or "ok")]

# the master: `cluster start`, killed by itself right after the tunnel holder was started
MASTER = textwrap.dedent("""
    import os, signal, subprocess, sys
    from controller.providers.remote import tunnels
    from controller.api import Cluster

    real_popen = subprocess.Popen

    def popen_then_die(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # before spawn returns: no tunnels.pid is ever written
        return process

    tunnels.subprocess.Popen = popen_then_die
    Cluster(config_file=sys.argv[1]).start()
""")


def holders(profile: Path) -> list[int]:
    found = []
    for pid in processes.marked_processes(profile):
        try:
            if b"controller.providers.remote.tunnels" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with NetnsHosts(1, tmp_path_factory.mktemp("netns"), first_subnet=41) as made:
        made.key = client_key(made.workdir)
        made.hosts[0].authorize(made.key)
        yield made


def test_stop_ends_the_tunnel_holder_after_the_master_was_killed_during_start(tmp_path, tiny_data_dir, hosts):
    config = make_config(
        tmp_path,
        tiny_data_dir,
        slaves=1,
        extra=f"""
provider = ssh

[ssh]
hosts = {hosts.hosts[0].address}
user = {SLAVE_USER}
key_file = {hosts.key}
python = {sys.executable}
tunnel = always
""",
    )
    profile = profile_dir(config.state_dir)
    master = subprocess.run(
        [sys.executable, "-c", MASTER, str(config.source)], cwd=str(REPO), capture_output=True, text=True, timeout=300
    )
    assert master.returncode == -signal.SIGKILL, master.stderr
    assert not (config.state_dir / "tunnels" / "test" / "tunnels.pid").exists()
    (holder,) = holders(profile)
    os.kill(holder, signal.SIGSTOP)  # it cannot look for its ready file now: only stop can end it
    try:
        cluster = Cluster(config)
        cluster.stop()
        cluster.close()
        assert wait_until(lambda: not processes.pid_alive(holder), timeout=20)
        assert wait_until(lambda: not cluster_pids(config.state_dir), timeout=20)
    finally:
        for pid in holders(profile) + cluster_pids(config.state_dir):
            processes.kill_process_group(pid)

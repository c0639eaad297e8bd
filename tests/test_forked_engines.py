"""Local engines come from one fork server per cluster, which imported torch once; they behave as engines
ipyparallel started itself: stopped, killed and counted the same, and nothing outlives the cluster."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from controller.ipp import forked_engines
from engines.process import forkserver
from tests.helpers import cluster_pids, running_cluster, wait_until


def engine_processes(client) -> dict[int, tuple[int, int]]:
    """Engine id -> (pid, parent pid), as each engine sees itself."""
    view = client[client.ids]
    return dict(zip(client.ids, zip(view.apply_sync(os.getpid), view.apply_sync(os.getppid))))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_data_dir):
    with running_cluster(tmp_path_factory.mktemp("forked"), tiny_data_dir, slaves=2) as running:
        yield running


class TestALocalCluster:
    def test_its_engines_are_children_of_one_fork_server_of_that_cluster(self, cluster):
        record = cluster.record
        servers = forked_engines.server_pids(Path(record.profile_dir), record.ipp_cluster_id)
        assert len(servers) == 1, f"fork servers: {servers}"
        parents = {parent for _pid, parent in engine_processes(cluster.client).values()}
        assert parents == set(servers)

    def test_a_forked_engine_has_torch_and_our_code_loaded_before_its_first_task(self, cluster):
        modules = cluster.client[:].apply_sync(
            eval, "sorted(set(__import__('sys').modules) & {'torch', 'engines.loop', 'engines.optim'})"
        )
        assert all(found == ["engines.loop", "engines.optim", "torch"] for found in modules)

    def test_each_engine_leads_its_own_session_as_ipyparallel_starts_engines(self, cluster):
        for pid, _parent in engine_processes(cluster.client).values():
            assert os.getsid(pid) == pid and os.getpgid(pid) == pid

    def test_forked_engines_do_not_share_numpy_s_random_state(self, cluster):
        draws = cluster.client[:].apply_sync(eval, "__import__('numpy').random.randint(1 << 30)")
        assert len(set(draws)) == len(draws), draws

    def test_each_engine_is_named_ipengine_for_ps_and_top(self, cluster):
        for pid, _parent in engine_processes(cluster.client).values():
            assert psutil.Process(pid).name() == "ipengine"

    def test_scaling_up_forks_the_new_engine_from_the_same_server(self, cluster):
        servers = forked_engines.server_pids(Path(cluster.record.profile_dir), cluster.record.ipp_cluster_id)
        cluster.scale(3)
        assert wait_until(lambda: len(cluster.client.ids) == 3, timeout=60)
        assert {parent for _pid, parent in engine_processes(cluster.client).values()} == set(servers)

    def test_an_engine_killed_outright_is_collected_at_once(self, cluster):
        victim_id, (victim, _parent) = sorted(engine_processes(cluster.client).items())[-1]
        os.kill(victim, signal.SIGKILL)
        # reaped by the server, not left a zombie: ipyparallel's launcher and our liveness checks see it gone
        assert wait_until(lambda: not psutil.pid_exists(victim), timeout=10)
        assert wait_until(lambda: victim_id not in cluster.client.ids, timeout=30)


def test_stop_leaves_no_fork_server(tmp_path, tiny_data_dir):
    with running_cluster(tmp_path, tiny_data_dir, slaves=1) as cluster:
        record = cluster.record
        assert forked_engines.server_pids(Path(record.profile_dir), record.ipp_cluster_id)
    # running_cluster asserted no marked process is left: the server carries the marker
    assert not cluster_pids(tmp_path / "state")


def test_engines_start_the_plain_way_when_the_fork_server_cannot_be_had(tmp_path, tiny_data_dir, monkeypatch, caplog):
    def unavailable(*args, **kwargs):
        raise forked_engines.ForkServerUnavailable("no server (test)")

    monkeypatch.setattr(forked_engines, "start_server", lambda *args: None)
    monkeypatch.setattr(forked_engines, "fork_engine", unavailable)
    with running_cluster(tmp_path, tiny_data_dir, slaves=1) as cluster:
        ((_pid, parent),) = engine_processes(cluster.client).values()
        assert parent == os.getpid(), "ipyparallel's launcher in this process started the engine itself"
        assert not forked_engines.server_pids(Path(cluster.record.profile_dir))
        assert cluster.train(epochs=1).run.state == "completed"
    assert "starts without the fork server: no server (test)" in caplog.text


class TestTheServer:
    @pytest.fixture
    def server(self, tmp_path):
        """A real fork server process on its own (no cluster), ready to answer."""
        name = f"test-{os.getpid()}-{tmp_path.name}"
        log = tmp_path / "server.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "engines.process.forkserver", name, "--idle-seconds", "600"],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
            )
        try:
            assert wait_until(lambda: "serving" in log.read_text() or process.poll() is not None, timeout=120)
            assert process.poll() is None, log.read_text()
            yield name, process, log
        finally:
            process.kill()
            process.wait()

    @staticmethod
    def ask_as(uid: int, name: str, request: dict) -> dict:
        """Ask the server from a child process running as ``uid``. The child makes only system calls (the
        request is encoded before the fork): this test process has threads whose locks the fork copies."""
        payload, address = json.dumps(request).encode() + b"\n", forkserver.address(name)
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                os.setuid(uid)
                connection = socket.socket(socket.AF_UNIX)
                connection.connect(address)
                try:  # the server may answer, and close, before it reads a request it refuses
                    connection.sendall(payload)
                except OSError:
                    pass
                try:
                    while chunk := connection.recv(65536):
                        os.write(write_end, chunk)
                except ConnectionResetError:  # closed with our request unread, after its answer
                    pass
            except BaseException as error:  # noqa: BLE001 - the parent shows it
                os.write(write_end, repr(error).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reply:
            answer = reply.read()
        os.waitpid(child, 0)
        try:
            return json.loads(answer)
        except ValueError:
            raise AssertionError(f"no answer from the server: {answer!r}") from None

    def test_a_process_of_another_user_is_refused_and_nothing_is_forked(self, server, tmp_path):
        name, process, _log = server
        target = tmp_path / "ran"
        request = {"argv": ["-c", "x"], "env": {}, "cwd": str(tmp_path), "output": str(target)}
        if os.getuid() != 0:
            pytest.skip("needs root to connect as another user")  # CI runs as root
        reply = self.ask_as(65534, name, request)
        assert "may not ask for an engine" in reply.get("error", ""), reply
        assert not psutil.Process(process.pid).children()
        assert not target.exists()

    def test_a_request_it_cannot_read_gets_an_error_and_the_server_goes_on(self, server):
        name, process, _log = server
        connection = socket.socket(socket.AF_UNIX)
        connection.connect(forkserver.address(name))
        connection.sendall(b"not json\n")
        reply = json.loads(connection.makefile().readline())
        connection.close()
        assert "error" in reply and process.poll() is None

    def test_a_second_server_of_the_same_name_leaves_at_once(self, server):
        name, _process, _log = server
        second = subprocess.run(
            [sys.executable, "-m", "engines.process.forkserver", name],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        )
        assert second.returncode == 0 and "another fork server holds" in second.stderr


def test_the_server_refuses_to_fork_while_another_thread_runs(tmp_path):
    server = forkserver.ForkServer(f"test-threads-{os.getpid()}")
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        with pytest.raises(RuntimeError, match="threads in the fork server"):
            server._fork({"argv": [], "env": {}, "cwd": str(tmp_path), "output": str(tmp_path / "out")}, None)
    finally:
        release.set()
        thread.join()


def test_without_engines_the_server_leaves_once_the_controller_is_gone(tmp_path):
    controller_file = tmp_path / "ipcontroller-x-engine.json"
    server = forkserver.ForkServer(f"test-done-{os.getpid()}", idle_seconds=3600, controller_file=controller_file)
    assert not server.done()  # no controller yet: it may still come (the server starts before it)
    controller_file.write_text("{}")
    assert not server.done()
    controller_file.unlink()
    assert server.done()


def test_without_engines_or_requests_the_server_leaves_after_its_idle_time():
    server = forkserver.ForkServer(f"test-idle-{os.getpid()}", idle_seconds=0)
    assert server.done()

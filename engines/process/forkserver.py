"""One process per local cluster that imports what an engine needs once, then forks engines ready-made.

A new engine spends most of its start importing: ipyparallel's engine (zmq, tornado, ipykernel), torch,
and our training code, about 3 s of CPU each on an idle machine.  Four engines started
at once on a 2-core master import side by side, and every `cluster scale` up pays it again.  This
server pays it once: it imports, then for each request forks a child that is an ipyparallel engine with
everything already in memory (shared copy-on-write with its siblings), as a plain
``python -m ipyparallel.engine ARGS`` would have been after its imports.

Fork is safe here because nothing before it has started a thread or touched a device: importing torch
starts neither its thread pools nor CUDA (both start on first use, in the engine).  The server checks
that it is alone in its process before each fork and refuses otherwise.

Protocol: a client connects to the server's abstract Unix socket (see ``address``), sends one JSON line
``{"argv", "env", "cwd", "output"}`` and reads one JSON line back, ``{"pid"}`` or ``{"error"}``.
Only processes of the server's own user may connect (checked with SO_PEERCRED): a fork runs any
argv it is given.  The server binds before it imports, so a client connects at once and its reply
waits for the imports; a second server for the same address finds it taken and leaves.

It ends with its cluster: `cluster stop` ends every process carrying the cluster's marker, which it
inherits; and with no engine of its own alive, it leaves once the controller's engine connection file
(which a controller removes as it exits) is gone after it was there, or after ``idle_seconds`` with
no request.

The client side, an ipyparallel launcher, is controller/ipp/forked_engines.py.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
import traceback
from pathlib import Path

from engines.process import startup

log = logging.getLogger(__name__)

# ipyparallel's engine app and what it imports, then what engines/process/startup.py would import in the engine
PRELOAD = ("ipyparallel.engine.app", *startup.PRELOAD)
IDLE_SECONDS = 120.0
MAX_REQUEST = 1 << 20


def address(name: str) -> str:
    """The abstract socket's address: no file, so no path-length limit and nothing left behind."""
    return "\0cluster-engine-forkserver-" + name


class ForkServer:
    def __init__(self, name: str, idle_seconds: float = IDLE_SECONDS, controller_file: Path | None = None):
        self.name = name
        self.idle_seconds = idle_seconds
        self.controller_file = controller_file
        self.controller_seen = False
        self.children: set[int] = set()
        self.listener: socket.socket | None = None
        self.last_activity = time.monotonic()

    def bind(self) -> bool:
        """False when another server already holds the address."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(address(self.name))
        except OSError:
            listener.close()
            return False
        listener.listen(64)
        self.listener = listener
        return True

    def preload(self, modules=PRELOAD) -> None:
        for module in modules:
            importlib.import_module(module)

    def serve(self) -> None:
        assert self.listener is not None
        self.listener.settimeout(1.0)
        signal.signal(signal.SIGCHLD, self._reap)
        while True:
            self._reap()
            try:
                connection, _ = self.listener.accept()
            except socket.timeout:
                if self.done():
                    return
                continue
            self.last_activity = time.monotonic()
            with connection:
                self._answer(connection)

    def done(self) -> bool:
        """Time to leave: no engine of ours alive, and the controller gone or no request for a while."""
        if self.controller_file is not None and self.controller_file.exists():
            self.controller_seen = True
        if self.engines_alive():
            return False
        if self.controller_seen and self.controller_file is not None and not self.controller_file.exists():
            log.info("the controller is gone and so are its engines: leaving")
            return True
        if time.monotonic() - self.last_activity > self.idle_seconds:
            log.info("no engine and no request for %.0f s: leaving", self.idle_seconds)
            return True
        return False

    def _answer(self, connection: socket.socket) -> None:
        connection.settimeout(30)
        try:
            uid = struct.unpack(
                "3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            )[1]
            if uid != os.getuid():
                raise PermissionError(f"uid {uid} may not ask for an engine (only {os.getuid()})")
            request = json.loads(read_line(connection))
            reply: dict[str, object] = {"pid": self._fork(request, connection)}
        except Exception as error:  # noqa: BLE001 - the client reports it, and starts its engine itself
            log.warning("could not fork an engine: %s", error)
            reply = {"error": f"{type(error).__name__}: {error}"}
        try:
            connection.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            log.warning("the client left before its answer (engine %s)", reply.get("pid"))

    def _fork(self, request: dict, connection: socket.socket) -> int:
        argv, env, cwd, output = request["argv"], request["env"], request["cwd"], request["output"]
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            raise RuntimeError(f"{threads} threads in the fork server: a fork would copy their locks held")
        pid = os.fork()
        if pid == 0:
            _become_engine(argv, env, cwd, output, close=(self.listener, connection))
        self.children.add(pid)
        return pid

    def _reap(self, *_signal) -> None:
        """Collect every ended engine at once (run on SIGCHLD too): until then it is a zombie, and its
        launcher, which waits for the pid to vanish, would think it still running."""
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            self.last_activity = time.monotonic()

    def engines_alive(self) -> int:
        # pids the signal handler reaped are gone from /proc; the set itself is only touched here and in _fork
        self.children = {pid for pid in self.children if os.path.exists(f"/proc/{pid}")}
        return len(self.children)


def read_line(connection: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data


def _name_process(name: bytes) -> None:
    """The kernel's name of this process (``ps -o comm``, ``top``, ``pgrep ipengine``): a fork keeps the
    server's command line, which only an exec could change."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _become_engine(argv: list[str], env: dict[str, str], cwd: str, output: str, close) -> None:
    """In the child: what ``Popen([python, -m, ipyparallel.engine, *argv], ...)`` would set up, then the engine.
    Never returns."""
    code = 1
    try:
        for sock in close:
            if sock is not None:
                sock.close()
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as the interpreter sets it at start
        os.setsid()  # its own session and group, as ipyparallel's launcher starts engines: signals reach it alone
        _name_process(b"ipengine")
        stdin = os.open(os.devnull, os.O_RDONLY)
        out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(stdin, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(stdin)
        os.close(out)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        logging.getLogger().handlers.clear()  # the server's handler; a plain engine starts with none
        if "numpy" in sys.modules:  # its global generator would be every sibling's (Python's own reseeds itself)
            sys.modules["numpy"].random.seed()
        sys.argv = [sys.argv[0], *argv]
        from ipyparallel.engine.app import main

        main()
        code = 0
    except SystemExit as leaving:
        code = leaving.code if isinstance(leaving.code, int) else (0 if leaving.code is None else 1)
    except BaseException:  # noqa: BLE001 - the engine's log file shows it; the exit status says it
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # the engine's own (IPython's, our fast exit): what an interpreter's exit runs
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.process.forkserver", description=__doc__.split("\n")[0])
    parser.add_argument("name", help="the server's name: clients find it by this")
    parser.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS)
    parser.add_argument("--controller-file", type=Path, help="the controller's engine connection file")
    options = parser.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s forkserver %(levelname)s %(message)s")
    server = ForkServer(options.name, options.idle_seconds, options.controller_file)
    if not server.bind():
        log.info("another fork server holds %s: leaving", options.name)
        return 0
    started = time.monotonic()
    server.preload()
    log.info("imported %s in %.1f s; serving", ", ".join(PRELOAD), time.monotonic() - started)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())

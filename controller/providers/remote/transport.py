"""Slaves over SSH (paramiko): connect with checked host keys, upload, bootstrap engines, stop them.

Shared by every provider whose slaves are machines reached over SSH (``ssh``
and ``aws``).  What it guarantees:

- Host keys are recorded on first contact in a per-cluster known_hosts file and
  enforced after that (a changed key is an error, never silently accepted).
- The engine connection file carries the controller's HMAC key: it travels only
  by SFTP, lands 0600 in a 0700 directory, and never appears in a command line
  or a log.
- Engines run in their own session (``setsid nohup``), so they outlive the SSH
  session; their pids are written to pid files on the slave, so ``stop`` finds
  them even when the master lost its local state.
"""
from __future__ import annotations

import errno
import hashlib
import io
import itertools
import json
import logging
import os
import posixpath
import select
import shlex
import socket
import tarfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import paramiko

import engines
from controller.errors import CredentialsError, ProviderError
from controller.ipp.processes import process_identity
from engines.spec import dataset_files

log = logging.getLogger(__name__)

ENGINES_PACKAGE = Path(engines.__file__).resolve().parent
# what an engine imports; checked on every slave before engines start
VERIFY_IMPORTS = "import engines, ipyparallel, torch, numpy; print(torch.__version__, torch.cuda.device_count())"
# the same modules, only looked for: what a slave verified before must still be installed
FIND_MODULES = ("import importlib.util as u; "
                "print(' '.join(m for m in ('engines', 'ipyparallel', 'torch', 'numpy') if u.find_spec(m) is None))")
# installed with the slave's own pip when the check fails (a DL AMI already has torch)
ENGINE_REQUIREMENTS = ("ipyparallel>=8.6", "numpy", "torch")
# the controller's engine-facing ports in an ipyparallel engine connection file
ENGINE_PORT_KEYS = ("registration", "control", "mux", "task", "iopub", "hb_ping", "hb_pong", "broadcast")


@dataclass(frozen=True)
class Host:
    """How to reach one slave over SSH."""

    address: str
    port: int = 22
    user: str = ""
    key_file: str = ""

    @classmethod
    def parse(cls, text: str, user: str = "", key_file: str = "") -> "Host":
        """``host`` or ``host:port`` (an IPv6 address in brackets: ``[::1]:2222``)."""
        text = text.strip()
        address, port = text, 22
        if text.startswith("["):
            address, _, rest = text[1:].partition("]")
            if rest.startswith(":"):
                port = int(rest[1:])
        elif text.count(":") == 1:
            address, port_text = text.split(":")
            port = int(port_text)
        return cls(address=address, port=port, user=user, key_file=key_file)

    def __str__(self) -> str:
        return self.address if self.port == 22 else f"{self.address}:{self.port}"


class RecordFirstContact(paramiko.MissingHostKeyPolicy):
    """Trust on first use, per cluster: an unknown host's key is recorded, then enforced.

    paramiko itself raises ``BadHostKeyException`` when a recorded key changes;
    this policy only runs for hosts not in the file yet.
    """

    _lock = threading.Lock()  # several slaves are bootstrapped at once; one file

    def __init__(self, known_hosts: Path):
        self.known_hosts = Path(known_hosts)

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        with self._lock:
            keys = paramiko.HostKeys()
            if self.known_hosts.exists():
                keys.load(str(self.known_hosts))
            keys.add(hostname, key.get_name(), key)
            client.get_host_keys().add(hostname, key.get_name(), key)
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            keys.save(str(self.known_hosts))
            self.known_hosts.chmod(0o600)
        log.info("recorded the host key of %s (%s) in %s", hostname, key.get_name(), self.known_hosts)


def _load_key(key_file: str) -> Optional[paramiko.PKey]:
    if not key_file:
        return None
    path = Path(key_file).expanduser()
    if not path.is_file():
        raise CredentialsError(f"SSH key file {path} does not exist")
    for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return kind.from_private_key_file(str(path))
        except (paramiko.SSHException, ValueError):
            continue
    raise CredentialsError(f"SSH key file {path}: not a private key paramiko can read (ed25519, ecdsa or rsa)")


class Cancel(threading.Event):
    """A cancel flag that also breaks what threads are blocked on.

    Setting it closes every socket and SSH session registered with it, so a thread
    waiting for a silent host's banner or a command's output returns at once instead
    of after its timeout: a Ctrl-C of ``cluster start`` cleans up in seconds.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._closers: dict[int, Callable[[], None]] = {}
        self._keys = itertools.count()

    def set(self) -> None:
        super().set()
        with self._lock:
            closers, self._closers = list(self._closers.values()), {}
        for close in closers:
            try:
                close()
            except Exception:  # noqa: BLE001 - already broken is as good as closed
                pass

    def on_cancel(self, close: Callable[[], None]) -> int:
        """Call ``close`` when this is set (at once if it already is); returns a key for ``forget``."""
        with self._lock:
            key = next(self._keys)
            if not self.is_set():
                self._closers[key] = close
                return key
        close()
        return key

    def forget(self, key: int) -> None:
        with self._lock:
            self._closers.pop(key, None)

    @contextmanager
    def closing(self, close: Callable[[], None]) -> Iterator[None]:
        key = self.on_cancel(close)
        try:
            yield
        finally:
            self.forget(key)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def open_socket(host: "Host", timeout: float, cancelled: Optional[threading.Event] = None) -> socket.socket:
    """A TCP connection to the host's SSH port, given up after ``timeout`` or as soon as ``cancelled`` is set.

    A blocking connect to a host that drops packets can be neither interrupted nor
    closed from another thread; this one polls in short slices instead.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host.address, host.port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        error = sock.connect_ex(address)
        deadline = time.monotonic() + timeout
        while error in (errno.EINPROGRESS, errno.EALREADY):
            if cancelled is not None and cancelled.is_set():
                raise ProviderError(f"{host}: cancelled")
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"connecting to {host} timed out")
            _, writable, failed = select.select([], [sock], [sock], min(0.2, left))
            if writable or failed:
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                break
        if error:
            raise OSError(error, os.strerror(error))
        sock.setblocking(True)
        return sock
    except BaseException:
        sock.close()
        raise


class Remote:
    """One SSH connection to a slave: run commands, upload files."""

    def __init__(self, host: Host, client: paramiko.SSHClient):
        self.host = host
        self.client = client

    @classmethod
    def connect(cls, host: Host, known_hosts: Path, *, timeout: float = 60, record_new: bool = True,
                cancelled: Optional[threading.Event] = None, attempt_timeout: float = 10) -> "Remote":
        """Connect, retrying with backoff until ``timeout`` (a booting slave refuses at first).

        ``record_new=False`` refuses hosts whose key is not recorded yet (for
        anything that runs after bootstrap: stop, tunnels).  ``cancelled`` ends the
        attempts at once (a :class:`Cancel` also breaks the attempt in flight).
        """
        pkey = _load_key(host.key_file)
        deadline = time.monotonic() + timeout
        delay = 0.5
        last: Exception | None = None
        while True:
            if cancelled is not None and cancelled.is_set():
                raise ProviderError(f"{host}: SSH connection cancelled")
            client = paramiko.SSHClient()
            if Path(known_hosts).exists():
                client.load_host_keys(str(known_hosts))
            client.set_missing_host_key_policy(RecordFirstContact(known_hosts) if record_new else paramiko.RejectPolicy())
            attempt = max(1.0, min(attempt_timeout, deadline - time.monotonic()))
            try:
                sock = open_socket(host, attempt, cancelled)
                closing = cancelled.closing(lambda: _shut(sock)) if isinstance(cancelled, Cancel) else nullcontext()
                with closing:
                    client.connect(
                        host.address, port=host.port, username=host.user or None, pkey=pkey, sock=sock,
                        timeout=attempt, banner_timeout=attempt, auth_timeout=attempt,
                        allow_agent=pkey is None, look_for_keys=pkey is None)
                transport = client.get_transport()
                if transport is not None:
                    transport.set_keepalive(15)
                return cls(host, client)
            except paramiko.BadHostKeyException as error:
                client.close()
                raise ProviderError(
                    f"{host}: its SSH host key changed since it was recorded in {known_hosts} "
                    f"(expected {error.expected_key.get_base64()[:16]}..., got {error.key.get_base64()[:16]}...); "
                    f"refusing to connect. If the machine was really reinstalled, remove its line from that file"
                ) from None
            except paramiko.AuthenticationException as error:
                # a fresh cloud instance may accept connections before its key is installed
                last = error
            except ProviderError:
                client.close()
                raise  # cancelled
            except (OSError, paramiko.SSHException, EOFError) as error:
                last = error
            client.close()
            if time.monotonic() + delay > deadline:
                break
            if cancelled is not None:
                cancelled.wait(delay)
            else:
                time.sleep(delay)
            delay = min(delay * 2, 5.0)
        if cancelled is not None and cancelled.is_set():
            raise ProviderError(f"{host}: SSH connection cancelled")
        if isinstance(last, paramiko.AuthenticationException):
            raise CredentialsError(f"{host}: SSH authentication failed for user {host.user or '(current)'} "
                                   f"with {host.key_file or 'the agent/default keys'}: {last}")
        raise ProviderError(f"{host}: no SSH connection within {timeout:.0f} s: {last}")

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Remote":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def local_address(self) -> str:
        """The master's address as this slave sees it: where it can reach the controller directly."""
        transport = self.client.get_transport()
        return transport.sock.getsockname()[0] if transport is not None else ""

    def run(self, command: str, *, check: bool = True, timeout: float = 600) -> tuple[int, str, str]:
        """Run a shell command; returns (status, stdout, stderr). Never pass secrets in ``command``."""
        log.debug("%s$ %s", self.host, command)
        _, stdout, stderr = self.client.exec_command(command, timeout=timeout)
        # both streams at once: one channel window serves both, so a command filling stderr while we
        # waited for stdout's end would block forever
        errors: list[bytes] = []
        reader = threading.Thread(target=lambda: errors.append(stderr.read()), daemon=True)
        reader.start()
        out = stdout.read().decode(errors="replace")
        reader.join(timeout)
        err = (errors[0] if errors else b"").decode(errors="replace")
        status = stdout.channel.recv_exit_status()
        if check and status != 0:
            raise ProviderError(f"{self.host}: `{command}` exited {status}: {err.strip()[-2000:] or out.strip()[-2000:]}")
        return status, out, err

    def upload(self, local: Path, remote_path: str, mode: int = 0o600) -> None:
        """Stream a local file by SFTP (data sets: too big to hold in memory twice)."""
        with self.client.open_sftp() as sftp:
            with sftp.open(remote_path, "wb") as handle:
                sftp.chmod(remote_path, mode)
                handle.set_pipelined(True)
                with open(local, "rb") as source:
                    while chunk := source.read(1 << 20):
                        handle.write(chunk)

    def put(self, data: bytes, remote_path: str, mode: int = 0o600) -> None:
        """Upload by SFTP; the mode is set before the content is written (secrets never sit world-readable)."""
        with self.client.open_sftp() as sftp:
            with sftp.open(remote_path, "wb") as handle:
                sftp.chmod(remote_path, mode)
                handle.write(data)


@dataclass
class EngineSpec:
    """What to start on one slave."""

    tag: str  # names the slave's run directory: engines of one cluster, findable without local state
    connection: dict  # the engine connection file as the slave must see it
    python: str = "python3"
    remote_dir: str = "~/.cluster-engine"
    engines_per_gpu: int = 1
    engines: int = 0  # fixed count; 0 = engines_per_gpu per GPU (1 on a machine without GPU)
    env: dict = field(default_factory=dict)
    install: bool = True  # pip-install the engine requirements when the check fails
    args: tuple = ()  # extra ipengine arguments (controller.ipp.launch.engine_args: the grace for a silent master, the startup command)
    owner: str = ""  # the cluster the engines serve (``owner_of``: state dir, controller): written to the run dir


@dataclass
class Bootstrapped:
    hostname: str
    gpus: int
    pids: list[int]
    remote_dir: str
    torch: str = ""


def engine_sources() -> list[Path]:
    """Every source file of the ``engines`` package, its subpackages included, in a stable order."""
    return sorted(path for path in ENGINES_PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def engines_tarball() -> bytes:
    """The master's own ``engines`` package: every slave runs exactly the code the master sends tasks for."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in engine_sources():
            tar.add(str(path), arcname=f"engines/{path.relative_to(ENGINES_PACKAGE).as_posix()}")
    return buffer.getvalue()


def resolve_dir(remote: Remote, remote_dir: str) -> str:
    """An absolute remote directory (``~`` expanded on the slave), created 0700."""
    _, home, _ = remote.run("cd && pwd")
    home = home.strip()
    path = home + remote_dir[1:] if remote_dir.startswith("~") else remote_dir
    remote.run(f"mkdir -p {shlex.quote(path)} && chmod 700 {shlex.quote(path)}")
    return path


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _remote_sha256(remote: Remote, paths: list[str]) -> dict[str, str]:
    if not paths:
        return {}
    _, out, _ = remote.run("sha256sum " + " ".join(shlex.quote(p) for p in paths) + " 2>/dev/null", check=False)
    found = {}
    for line in out.splitlines():
        digest, _, name = line.partition("  ")
        found[name] = digest
    return found


def sync_data(remote: Remote, master_data_dir: Path, slave_data_dir: str) -> list[str]:
    """Fill the slave's data_dir from the master's over SFTP: files missing there or different are copied
    to a temporary name, their sha256 checked on the slave, then renamed.  Returns what was copied.

    Nothing to copy when the master has no data set: the engines then download it themselves (only
    with ``download = true``)."""
    files = dataset_files(master_data_dir)
    base = resolve_dir(remote, slave_data_dir)
    if not files:
        return []
    wanted = {rel: _sha256(path) for rel, path in files.items()}
    have = _remote_sha256(remote, [f"{base}/{rel}" for rel in files])
    copy = [rel for rel in files if have.get(f"{base}/{rel}") != wanted[rel]]
    if not copy:
        return []
    folders = sorted({posixpath.dirname(f"{base}/{rel}") for rel in copy})
    remote.run("mkdir -p " + " ".join(shlex.quote(f) for f in folders))
    for rel in copy:
        remote.upload(files[rel], f"{base}/{rel}.part", mode=0o600)
    arrived = _remote_sha256(remote, [f"{base}/{rel}.part" for rel in copy])
    bad = [rel for rel in copy if arrived.get(f"{base}/{rel}.part") != wanted[rel]]
    if bad:
        raise ProviderError(f"{remote.host}: {', '.join(bad)} arrived in {base} with another sha256 than the "
                            f"master's copy in {master_data_dir}; check the slave's disk")
    remote.run("; ".join(f"mv -f {shlex.quote(f'{base}/{rel}.part')} {shlex.quote(f'{base}/{rel}')}"
                         for rel in copy))
    log.info("%s: copied %s into %s (sha256 checked)", remote.host, ", ".join(copy), base)
    return copy


def run_dir(base: str, tag: str) -> str:
    return f"{base}/run/{tag}"


def engines_digest() -> str:
    """sha256 over the ``engines`` package's sources (names and contents): what a slave's stamp must match."""
    digest = hashlib.sha256()
    for path in engine_sources():
        digest.update(path.relative_to(ENGINES_PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


STAMP = "engines.stamp"  # under remote_dir: the sources and interpreter the last bootstrap verified


def stamp_for(spec: EngineSpec, torch_version: str, gpus: int) -> dict:
    return {"sources": engines_digest(), "python": spec.python, "torch": torch_version, "gpus": gpus}


def stamped(remote: Remote, spec: EngineSpec) -> Optional[tuple[str, dict]]:
    """(base, stamp) when an earlier bootstrap left this master's engine code verified with this python on the
    slave, and the modules it needs are still there: its engines can start without upload or import check."""
    base = resolve_dir(remote, spec.remote_dir)
    q = shlex.quote
    _, out, _ = remote.run(f"cat {q(base)}/{STAMP} 2>/dev/null", check=False)
    try:
        stamp = json.loads(out)
    except ValueError:
        return None
    if not isinstance(stamp, dict) or {k: stamp.get(k) for k in ("sources", "python")} != {
            "sources": engines_digest(), "python": spec.python}:
        return None
    # found, not imported: milliseconds, where the import check takes seconds (torch); and the GPUs the driver
    # shows, so that a GPU gone (or added) since is counted again by torch, in a full bootstrap
    status, out, _ = remote.run(f"ls -d /dev/nvidia[0-9]* 2>/dev/null | wc -l; cd {q(base)} && "
                                f"PYTHONPATH={q(base)}/src {q(spec.python)} -c {q(FIND_MODULES)}", check=False)
    device_files, _, missing = out.strip().partition("\n")
    if status != 0 or missing.strip():
        log.info("%s: %s since the last bootstrap", remote.host,
                 f"{missing.strip()} missing" if status == 0 else "its python does not run")
        return None
    if device_files.strip().isdigit() and int(device_files) != int(stamp.get("gpus") or 0):
        log.info("%s: %s GPU device(s) where the last bootstrap counted %s", remote.host, device_files.strip(),
                 stamp.get("gpus"))
        return None
    return base, stamp


def start(remote: Remote, spec: EngineSpec, cancelled: Optional[threading.Event] = None) -> Bootstrapped:
    """Start engines on a slave: at once when a bootstrap verified this code with this python there before (a
    slave started again, or adopted after a master restart), else after a full ``bootstrap``.

    Engines an earlier start of the cluster left there are stopped first. ``cancelled`` is checked just
    before engines start, so a failing or interrupted ``cluster start`` never leaves engines behind on a
    slave that was still bootstrapping.
    """
    found = stamped(remote, spec)
    if found is not None:
        log.info("%s: engine code and python as verified by an earlier bootstrap; starting engines", remote.host)
    base, stamp = found if found is not None else bootstrap(remote, spec)
    gpus = int(stamp.get("gpus") or 0)
    _, hostname, _ = remote.run("hostname")
    refuse_a_live_owner(remote, base, spec)
    stop_leftovers(remote, base, spec.tag)
    if cancelled is not None and cancelled.is_set():
        raise ProviderError(f"{remote.host}: start cancelled before engines were started")
    pids = start_engines(remote, base, spec, spec.engines or spec.engines_per_gpu * max(gpus, 1), gpus, f"{base}/src")
    return Bootstrapped(hostname=hostname.strip(), gpus=gpus, pids=pids, remote_dir=base,
                        torch=str(stamp.get("torch", "")))


def bootstrap(remote: Remote, spec: EngineSpec) -> tuple[str, dict]:
    """Upload the engine code, verify (or install) the engine environment, and stamp the slave with what was
    verified; returns (base, stamp)."""
    base = resolve_dir(remote, spec.remote_dir)
    q = shlex.quote
    src = f"{base}/src"
    remote.run(f"rm -f {q(base)}/{STAMP}")  # stale while the code below changes under it
    remote.run(f"mkdir -p {q(src)}")
    remote.put(engines_tarball(), f"{base}/engines.tar.gz", mode=0o600)
    remote.run(f"rm -rf {q(src)}/engines && tar -xzf {q(base)}/engines.tar.gz -C {q(src)}")
    python = q(spec.python)  # config-validated too; quoted all the same, like every remote argument
    verify = f"cd {q(base)} && PYTHONPATH={q(src)} {python} -c {q(VERIFY_IMPORTS)}"
    status, out, err = remote.run(verify, check=False)
    if status != 0 and spec.install:
        log.info("%s: engine environment incomplete (%s); installing %s", remote.host,
                 err.strip().splitlines()[-1:] or "?", ", ".join(ENGINE_REQUIREMENTS))
        remote.run(f"{python} -m pip install -q --user " + " ".join(q(r) for r in ENGINE_REQUIREMENTS), timeout=1800)
        status, out, err = remote.run(verify, check=False)
    if status != 0:
        raise ProviderError(f"{remote.host}: the engine environment does not work with {python}: "
                            f"{(err.strip() or out.strip())[-1500:]}")
    torch_version, _, gpu_text = out.strip().splitlines()[-1].partition(" ")
    stamp = stamp_for(spec, torch_version, int(gpu_text or 0))
    remote.put(json.dumps(stamp).encode(), f"{base}/{STAMP}", mode=0o600)
    return base, stamp


def start_engines(remote: Remote, base: str, spec: EngineSpec, count: int, gpus: int, src: str) -> list[int]:
    q = shlex.quote
    rundir = run_dir(base, spec.tag)
    remote.run(f"mkdir -p {q(rundir)} {q(base)}/profile && chmod 700 {q(base)}/run {q(rundir)} {q(base)}/profile")
    connection = f"{rundir}/engine.json"
    # by SFTP, 0600 from the first byte: it carries the controller's HMAC key
    remote.put(json.dumps(spec.connection).encode(), connection, mode=0o600)
    if spec.owner:
        remote.put(spec.owner.encode(), f"{rundir}/{OWNER}", mode=0o600)
    pids = []
    for index in range(count):
        env = {"PYTHONPATH": src, **spec.env}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        assignments = " ".join(f"{k}={q(str(v))}" for k, v in env.items())
        engine = (f"{q(spec.python)} -m ipyparallel.engine --file={q(connection)} "
                  f"--profile-dir={q(base)}/profile" + "".join(f" {q(a)}" for a in spec.args))
        # setsid: its own session and process group, so it survives this SSH session and
        # stop can signal the whole group; the pid file lets stop find it without local state
        # a simple command in the background (not an && list: that would background a subshell
        # holding the SSH channel open, and $! would not be the engine)
        command = (f"cd {q(base)} || exit 1; {assignments} setsid nohup {engine} "
                   f"> {q(rundir)}/engine-{index}.log 2>&1 < /dev/null & "
                   f"echo $! > {q(rundir)}/engine-{index}.pid; echo $!")
        _, out, _ = remote.run(command)
        pids.append(int(out.strip().splitlines()[-1]))
    log.info("%s: started %d engine(s), pids %s", remote.host, count, pids)
    return pids


STOP_SCRIPT = r"""
dir={rundir}
profile={profile}
# the run dir's pid files, and pids the master's store holds (the run dir may carry another name: the tag
# includes the master's hostname); a pid is signalled only while it is still an engine of this remote_dir,
# never a pid reused since (a pid file can outlive a reboot of the slave)
pids=
for pid in $(cat {pid_files} 2>/dev/null) {known}; do
  case "$(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null)" in
    *ipyparallel.engine*"--profile-dir=$profile"*) pids="$pids $pid" ;;
  esac
done
pids=$(echo $pids | tr ' ' '\n' | sort -un)
[ -n "$pids" ] && echo "found:" $pids
for pid in $pids; do kill -TERM -- -$pid 2>/dev/null || kill -TERM $pid 2>/dev/null; done
for i in 1 2 3 4 5 6 7 8 9 10; do
  alive=; for pid in $pids; do kill -0 $pid 2>/dev/null && alive=1; done
  [ -z "$alive" ] && break; sleep 0.5
done
for pid in $pids; do kill -KILL -- -$pid 2>/dev/null; kill -KILL $pid 2>/dev/null; done
# a killed engine still frees its memory before it is gone: seconds on a busy slave, not a fixed 0.2 s
for i in $(seq 1 40); do
  left=; for pid in $pids; do [ -d /proc/$pid ] && [ "$(cut -d' ' -f3 /proc/$pid/stat 2>/dev/null)" != Z ] && left="$left $pid"; done
  [ -z "$left" ] && break; sleep 0.25
done
[ -n "$left" ] && echo "left:$left"
[ -d "$dir" ] && {cleanup}
exit 0
"""


@dataclass(frozen=True)
class Stopped:
    """What a stop found on a slave: the engines it signalled, and those still alive afterwards."""
    found: list[int]
    left: list[int]


def _stop(remote: Remote, base: str, tag: str, pids: tuple[int, ...] = (), run_dir_too: bool = True) -> Stopped:
    """``run_dir_too``: the engines its pid files name as well, and the run dir removed afterwards."""
    known = " ".join(str(int(p)) for p in pids)
    script = STOP_SCRIPT.format(rundir=shlex.quote(run_dir(base, tag)), profile=shlex.quote(f"{base}/profile"),
                                known=known, pid_files='"$dir"/engine-*.pid' if run_dir_too else "/dev/null",
                                cleanup='rm -rf "$dir"' if run_dir_too else "true")
    _, out, _ = remote.run(f"sh -c {shlex.quote(script)}", timeout=60)

    def listed(prefix: str) -> list[int]:
        return [int(p) for line in out.splitlines() if line.startswith(prefix) for p in line[len(prefix):].split()]

    return Stopped(found=listed("found:"), left=listed("left:"))


def stop_engines(remote: Remote, remote_dir: str, tag: str, pids: tuple[int, ...] = (), owner: str = "") -> list[int]:
    """Stop the engines of ``tag`` on this slave (pid files, plus pids the store knows), remove its run dir.
    When the run dir is another running cluster's (``owner``: this cluster, as ``owner_of`` writes it), only
    the pids the store knows are stopped, and the run dir stays.

    Returns the pids still alive afterwards (nothing, normally)."""
    base = resolve_dir(remote, remote_dir)
    other = other_live_owner(remote, base, tag, owner)
    if other is not None:
        log.info("%s: %s is another running cluster's (controller pid %d, state_dir %s): only this cluster's "
                 "recorded engines are stopped there", remote.host, run_dir(base, tag), other.controller_pid,
                 other.state_dir)
    return _stop(remote, base, tag, pids, run_dir_too=other is None).left


OWNER = "owner"  # in a run dir: the cluster its engines serve (state dir, controller), as ``owner_of`` wrote it


def owner_of(controller_pid: Optional[int], state_dir: Path) -> str:
    """The cluster a run dir's engines serve, as the run dir records it: the master's state dir, and its
    controller (pid and that process's identity on this master: the tag names the master's host)."""
    return json.dumps({"state_dir": str(Path(state_dir).resolve()), "controller_pid": controller_pid or 0,
                       "identity": process_identity(controller_pid) if controller_pid else ""})


@dataclass(frozen=True)
class OtherCluster:
    controller_pid: int
    state_dir: str


def other_live_owner(remote: Remote, base: str, tag: str, owner: str) -> Optional[OtherCluster]:
    """Another cluster whose engines use this run dir and whose controller still runs (two checkouts, or two
    state dirs, on this master with one cluster name); None when the run dir is this state dir's (now or from
    an earlier start), free, or left by a controller that is gone."""
    _, text, _ = remote.run(f"cat {shlex.quote(run_dir(base, tag))}/{OWNER} 2>/dev/null", check=False)
    try:
        theirs, ours = json.loads(text), json.loads(owner or "{}")
        pid, identity, state_dir = theirs["controller_pid"], theirs["identity"], theirs["state_dir"]
    except (ValueError, KeyError, TypeError):
        return None
    if state_dir == ours.get("state_dir") or not isinstance(pid, int) or pid <= 0 or not identity:
        return None
    return OtherCluster(pid, str(state_dir)) if process_identity(pid) == identity else None


def refuse_a_live_owner(remote: Remote, base: str, spec: EngineSpec) -> None:
    """The run dir is another live cluster's: its engines are not leftovers, and stopping them would end that
    cluster's work."""
    rundir = run_dir(base, spec.tag)
    other = other_live_owner(remote, base, spec.tag, spec.owner)
    if other is not None:
        raise ProviderError(
            f"{remote.host}: {rundir} holds the engines of another cluster of this master that is still running "
            f"(its controller, pid {other.controller_pid}, of the state_dir {other.state_dir}, with the same "
            f"[cluster] name): stop that cluster first (`cluster stop` with its configuration), or give this one "
            f"another [cluster] name")


def stop_leftovers(remote: Remote, base: str, tag: str) -> None:
    """Before a bootstrap starts engines: stop those an earlier start of this cluster left in its run dir (a
    slave that was lost and came back, a master that lost its state dir). They wait for their old controller
    for up to master_grace_minutes, holding their GPU all that time."""
    stopped = _stop(remote, base, tag)
    if stopped.found:
        log.warning("%s: stopped %d engine(s) an earlier start of this cluster left running (pids %s)",
                    remote.host, len(stopped.found), " ".join(map(str, stopped.found)))
    if stopped.left:
        raise ProviderError(f"{remote.host}: engines left by an earlier start of this cluster (pids "
                            f"{' '.join(map(str, stopped.left))}) did not stop; stop them there and start again")


def engine_ports(connection: dict) -> list[int]:
    ports: list[int] = []
    for key in ENGINE_PORT_KEYS:
        value = connection.get(key)
        if isinstance(value, int):
            ports.append(value)
        elif isinstance(value, list):
            ports.extend(int(v) for v in value)
    return ports


def connection_for(connection: dict, controller_address: str, ports: Optional[dict[int, int]] = None) -> dict:
    """The engine connection file as one slave must see it: the controller at ``controller_address``, on the
    ports ``ports`` maps the controller's to (a slave's ends of its SSH reverse tunnels), or on its own."""
    copy = dict(connection)
    for key in ENGINE_PORT_KEYS if ports else ():
        value = copy.get(key)
        if isinstance(value, int):
            copy[key] = ports[value]
        elif isinstance(value, list):
            copy[key] = [ports[int(v)] for v in value]
    copy["interface"] = f"tcp://{controller_address}"
    copy["location"] = controller_address
    copy.pop("ssh", None)
    return copy


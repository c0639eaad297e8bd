"""SSH to a slave (paramiko): connect with checked host keys, run commands, upload files, be cancelled.

- Host keys are recorded on first contact in a per-cluster known_hosts file and enforced after that (a
  changed key is an error, never silently accepted).
- Secrets (the engine connection file carries the controller's HMAC key) travel only by SFTP, 0600 from
  the first byte, never in a command line or a log.
- Every connect, command and upload can be cancelled at once from another thread (:class:`Cancel`), so a
  Ctrl-C of ``cluster start`` cleans up in seconds.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import select
import shlex
import socket
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Optional

import paramiko

from controller.errors import CredentialsError, ProviderError
from controller.providers.base import SshTarget

log = logging.getLogger(__name__)


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


def load_key(key_file: str) -> Optional[paramiko.PKey]:
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


def open_socket(host: SshTarget, timeout: float, cancelled: Optional[threading.Event] = None) -> socket.socket:
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


class SshConnection:
    """One SSH connection to a slave: run commands, upload files."""

    def __init__(self, host: SshTarget, client: paramiko.SSHClient):
        self.host = host
        self.client = client

    @classmethod
    def connect(
        cls,
        host: SshTarget,
        known_hosts: Path,
        *,
        timeout: float = 60,
        record_new: bool = True,
        cancelled: Optional[threading.Event] = None,
        attempt_timeout: float = 10,
    ) -> "SshConnection":
        """Connect, retrying with backoff until ``timeout`` (a booting slave refuses at first).

        ``record_new=False`` refuses hosts whose key is not recorded yet (for
        anything that runs after bootstrap: stop, tunnels).  ``cancelled`` ends the
        attempts at once (a :class:`Cancel` also breaks the attempt in flight).
        """
        pkey = load_key(host.key_file)
        deadline = time.monotonic() + timeout
        delay = 0.5
        last: Exception | None = None
        while True:
            if cancelled is not None and cancelled.is_set():
                raise ProviderError(f"{host}: SSH connection cancelled")
            client = paramiko.SSHClient()
            if Path(known_hosts).exists():
                client.load_host_keys(str(known_hosts))
            client.set_missing_host_key_policy(
                RecordFirstContact(known_hosts) if record_new else paramiko.RejectPolicy()
            )
            attempt = max(1.0, min(attempt_timeout, deadline - time.monotonic()))
            try:
                sock = open_socket(host, attempt, cancelled)
                closing = (
                    cancelled.closing(functools.partial(_shut, sock))
                    if isinstance(cancelled, Cancel)
                    else nullcontext()
                )
                with closing:
                    client.connect(
                        host.address,
                        port=host.port,
                        username=host.user or None,
                        pkey=pkey,
                        sock=sock,
                        timeout=attempt,
                        banner_timeout=attempt,
                        auth_timeout=attempt,
                        allow_agent=pkey is None,
                        look_for_keys=pkey is None,
                    )
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
            raise CredentialsError(
                f"{host}: SSH authentication failed for user {host.user or '(current)'} "
                f"with {host.key_file or 'the agent/default keys'}: {last}"
            )
        raise ProviderError(f"{host}: no SSH connection within {timeout:.0f} s: {last}")

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "SshConnection":
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
            raise ProviderError(
                f"{self.host}: `{command}` exited {status}: {err.strip()[-2000:] or out.strip()[-2000:]}"
            )
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


def resolve_dir(remote: SshConnection, remote_dir: str) -> str:
    """An absolute remote directory (``~`` expanded on the slave), created 0700."""
    _, home, _ = remote.run("cd && pwd")
    home = home.strip()
    path = home + remote_dir[1:] if remote_dir.startswith("~") else remote_dir
    remote.run(f"mkdir -p {shlex.quote(path)} && chmod 700 {shlex.quote(path)}")
    return path

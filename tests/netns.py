"""Slaves for tests: network namespaces joined to the master by veth pairs, each running a real sshd.

Every host gets its own namespace ``gclt-<run>-<i>`` and UTS namespace (its own
hostname), a veth pair on 10.213.<n>.0/24 (master .1, slave .2), a loopback,
and Debian's OpenSSH server on port 22 with its own host key.

The slaves are honest about being other machines: sshd logs in a non-root user
(``SLAVE_USER``) whose home is the host's own folder, and runs in a mount
namespace where the master's checkout, home and temporary directory (every
test's state_dir and data_dir) are empty tmpfs.  Only the Python environment
the engines need (the venv and its base interpreter) is bound back, read-only;
the ``engines`` package itself comes from what bootstrap uploads.  So any master
path that leaks to a slave fails a test.

``NetnsHosts.close`` kills every process in each namespace (sshd, engines),
then deletes namespaces and veths; ``clean_stale`` removes what a crashed
earlier run left (by name prefix).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

PREFIX = "gclt"
SUBNET = "10.213"
SSHD = "/usr/sbin/sshd"
SLAVE_USER = "gcltslave"  # the login user on every namespace slave: not root, not the master's user
SLAVE_ROOT = Path("/var/lib/gclt-slave")  # inside a slave's mount namespace: its own folder (home below)
REPO = Path(__file__).resolve().parent.parent


def unavailable() -> str:
    """Why these hosts cannot run here ('' when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not Path(SSHD).exists():
        return "openssh-server is not installed (make system-deps / apt-get install openssh-server)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "iproute2/util-linux missing"
    if shutil.which("useradd") is None:
        return "useradd (passwd) missing: the slaves log in a user of their own"
    probe = subprocess.run(["ip", "netns", "add", f"{PREFIX}-probe-{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"{PREFIX}-probe-{os.getpid()}"], capture_output=True)
    return ""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def kill_namespace(ns: str) -> None:
    for _ in range(3):
        pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    sh("ip", "netns", "del", ns, check=False)


def ensure_slave_user() -> None:
    if subprocess.run(["id", "-u", SLAVE_USER], capture_output=True).returncode != 0:
        # another test worker may add it at the same moment: whoever loses finds it there
        added = sh(
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            str(SLAVE_ROOT / "home"),
            "--shell",
            "/bin/sh",
            SLAVE_USER,
            check=False,
        )
        if subprocess.run(["id", "-u", SLAVE_USER], capture_output=True).returncode != 0:
            raise RuntimeError(f"useradd {SLAVE_USER} failed: {added.stderr.strip()}")
    # no password, but not locked: sshd without PAM refuses locked ones; usermod takes /etc/passwd's lock,
    # which another test worker may hold for a moment
    for _attempt in range(50):
        if sh("getent", "shadow", SLAVE_USER, check=False).stdout.split(":")[1:2] == ["*"]:
            return
        if sh("usermod", "-p", "*", SLAVE_USER, check=False).returncode == 0:
            return
        time.sleep(0.1)
    sh("usermod", "-p", "*", SLAVE_USER)


def _outermost(paths: list[Path]) -> list[Path]:
    """Existing directories, without those inside another one of the list."""
    found = sorted({p.resolve() for p in paths if p.is_dir()})
    return [p for p in found if not any(p != q and p.is_relative_to(q) for q in found)]


def hidden_dirs() -> list[Path]:
    """What a slave must not see: the master's checkout, its home (caches, the default data_dir) and the
    temporary directory (every test's state_dir and data_dir), and the shared data sets."""
    return _outermost([REPO, Path.home(), Path(tempfile.gettempdir()), REPO.parent / "shared" / "data"])


def python_environment(hidden: list[Path]) -> list[Path]:
    """What the engines' Python needs from inside the hidden directories: the venv (this checkout's
    .venv, installed editable or not), the interpreter it points at, site-packages added by .pth files."""
    wanted = [Path(sys.prefix), Path(sys.base_prefix)] + [Path(p) for p in sys.path if p.endswith("site-packages")]
    return [p for p in _outermost(wanted) if any(p.is_relative_to(h) for h in hidden)]


def clean_stale() -> None:
    """Namespaces and veths of earlier runs whose process is gone."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(PREFIX + "-"):
            owner = ns.split("-")[1]
            if not owner.isdigit() or not Path(f"/proc/{owner}").exists():
                kill_namespace(ns)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(PREFIX):
            owner = name[len(PREFIX) :].split("x")[0]
            if not owner.isdigit() or not Path(f"/proc/{owner}").exists():
                sh("ip", "link", "del", name, check=False)


@dataclass
class NetnsHost:
    index: int
    ns: str
    veth: str
    address: str  # the slave's address
    master_address: str
    alias: str  # a second address of the same slave, as a DNS name beside an IP address would be
    hostname: str
    dir: Path
    sshd: subprocess.Popen | None = None
    authorized_keys: Path = field(init=False)

    def __post_init__(self) -> None:
        self.authorized_keys = self.dir / "authorized_keys"

    def authorize(self, key_file: str | Path) -> None:
        """Add the public half of a private key (what cloud-init does with an EC2 key pair)."""
        key = None
        for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            try:
                key = kind.from_private_key_file(str(key_file))
                break
            except (paramiko.SSHException, ValueError):
                continue
        assert key is not None, f"cannot read {key_file}"
        with open(self.authorized_keys, "a") as handle:
            handle.write(f"{key.get_name()} {key.get_base64()}\n")
        self.authorized_keys.chmod(0o644)  # public keys; sshd reads them as the slave user

    def host_key_line(self) -> str:
        return (self.dir / "host_key.pub").read_text().strip()

    def processes(self) -> list[int]:
        return [int(p) for p in sh("ip", "netns", "pids", self.ns, check=False).stdout.split()]

    def engine_processes(self) -> list[int]:
        """Pids of ipyparallel engines running inside this namespace."""
        found = []
        for pid in self.processes():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"ipyparallel.engine" in cmdline:
                found.append(pid)
        return found

    def engine_pids(self) -> list[int]:
        """Engines, not their nanny processes."""
        found = []
        for pid in self.engine_processes():
            try:
                if b"nanny" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
        return found

    def engine_count(self) -> int:
        return len(self.engine_pids())


class NetnsHosts:
    """N namespace hosts; use as a context manager (``close`` always runs)."""

    key: Path  # the client key the hosts authorise: set by whoever made them (``client_key``), not here

    def __init__(self, count: int, workdir: Path, first_subnet: int = 1):
        self.workdir = Path(workdir)
        self.hosts: list[NetnsHost] = []
        self.count = count
        self.first_subnet = first_subnet

    def __enter__(self) -> "NetnsHosts":
        clean_stale()
        ensure_slave_user()
        SLAVE_ROOT.mkdir(parents=True, exist_ok=True)  # the mount point of each slave's own folder
        try:
            for i in range(self.count):
                self._make(i)
            for host in self.hosts:
                self._wait_sshd(host)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make(self, i: int) -> NetnsHost:
        run = os.getpid()
        n = self.first_subnet + i
        ns = f"{PREFIX}-{run}-{n}"
        veth = f"{PREFIX}{run}x{n}"[:15]
        peer = f"{PREFIX}p{run}x{n}"[:15]
        folder = self.workdir / f"host{n}"
        folder.mkdir(parents=True, exist_ok=True)
        host = NetnsHost(
            index=i,
            ns=ns,
            veth=veth,
            address=f"{SUBNET}.{n}.2",
            master_address=f"{SUBNET}.{n}.1",
            alias=f"{SUBNET}.{n}.3",
            hostname=f"slave{n}",
            dir=folder,
        )
        self.hosts.append(host)  # registered first: close() removes even a half-made host
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", ns)
        sh("ip", "addr", "add", f"{host.master_address}/24", "dev", veth)
        sh("ip", "link", "set", veth, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{host.address}/24", "dev", peer)
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{host.alias}/24", "dev", peer)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", peer, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key"))
        folder.chmod(0o755)  # the slave user passes through it to its home; the host key stays 0600
        host.authorized_keys.touch(mode=0o644)
        home = folder / "home"  # each slave its own home
        home.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(home, SLAVE_USER, SLAVE_USER)
        config = folder / "sshd_config"
        config.write_text(f"""
Port 22
ListenAddress {host.address}
ListenAddress {host.alias}
HostKey {SLAVE_ROOT / "host_key"}
PidFile {SLAVE_ROOT / "sshd.pid"}
AuthorizedKeysFile {SLAVE_ROOT / "authorized_keys"}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers {SLAVE_USER}
AllowTcpForwarding yes
GatewayPorts no
Subsystem sftp internal-sftp
LogLevel INFO
""")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        # its own UTS namespace (hostname, as engines report it) and mount namespace (what it can see)
        host.sshd = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "unshare",
                "--uts",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                self._slave_script(host),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # a Ctrl-C of the test must not kill the slaves' sshd
        return host

    @staticmethod
    def _slave_script(host: NetnsHost) -> str:
        """Inside the new mount namespace: the host's folder at SLAVE_ROOT, the master's directories
        hidden under empty tmpfs, the Python environment bound back read-only, then sshd."""
        q = shlex.quote
        hidden = hidden_dirs()
        environment = python_environment(hidden)
        lines = ["set -e", f"hostname {q(host.hostname)}", f"mount --bind {q(str(host.dir))} {q(str(SLAVE_ROOT))}"]
        for index, path in enumerate(environment):  # staged first: hiding makes the originals unreachable
            stage = host.dir / "env" / str(index)
            stage.mkdir(parents=True, exist_ok=True)
            lines.append(f"mount --bind {q(str(path))} {q(str(SLAVE_ROOT / 'env' / str(index)))}")
        temp = Path(tempfile.gettempdir()).resolve()
        for path in hidden:
            mode = "1777" if path == temp else "755"
            lines.append(f"mount -t tmpfs -o mode={mode} gclt-hidden {q(str(path))}")
        for index, path in enumerate(environment):
            lines += [
                f"mkdir -p {q(str(path))}",
                f"mount --bind {q(str(SLAVE_ROOT / 'env' / str(index)))} {q(str(path))}",
                f"mount -o remount,bind,ro {q(str(path))}",
            ]
        lines.append(f"exec {SSHD} -D -f {q(str(SLAVE_ROOT / 'sshd_config'))} -E {q(str(SLAVE_ROOT / 'sshd.log'))}")
        return "\n".join(lines)

    def _wait_sshd(self, host: NetnsHost, timeout: float = 20) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((host.address, 22), timeout=1) as conn:
                    if conn.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if host.sshd is not None and host.sshd.poll() is not None:
                break
            time.sleep(0.1)
        log = (host.dir / "sshd.log").read_text() if (host.dir / "sshd.log").exists() else ""
        raise RuntimeError(f"sshd in {host.ns} did not come up: {log[-1000:]}")

    def close(self) -> None:
        for host in self.hosts:
            kill_namespace(host.ns)  # sshd and every engine started through it
            if host.sshd is not None:
                try:
                    host.sshd.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    host.sshd.kill()
            sh("ip", "link", "del", host.veth, check=False)
        self.hosts = []


def client_key(folder: Path) -> Path:
    """A fresh ed25519 key for the master's user."""
    path = Path(folder) / "id_ed25519"
    if not path.exists():
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path))
    path.chmod(0o600)
    return path

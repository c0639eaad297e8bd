"""What a started cluster exposes, for the tests that check it: listening sockets, file modes, secrets
in the CLI's output. Shared by test_security and test_aws_provider (whose spot cluster is started once
for every check on it)."""

from __future__ import annotations

import io
import logging
import stat
from pathlib import Path

import psutil

from controller.cli import main
from controller.ipp.profile import profile_dir
from controller.providers.aws import network
from tests.helpers import cluster_pids


def listening(state_dir: Path) -> dict[int, set[str]]:
    """Port -> addresses of every TCP socket that the cluster's local processes listen on."""
    pids = set(cluster_pids(state_dir))
    found: dict[int, set[str]] = {}
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            found.setdefault(c.laddr.port, set()).add(c.laddr.ip)
    return found


def addresses(sockets: dict[int, set[str]], ports=None) -> set[str]:
    return {ip for port, ips in sockets.items() if ports is None or port in ports for ip in ips}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_private_files(state_dir: Path) -> None:
    """state_dir and the profile 0700; connection files (HMAC or CurveZMQ key) 0600 in a 0700 folder."""
    assert mode(state_dir) == 0o700
    security = profile_dir(state_dir) / "security"
    assert mode(profile_dir(state_dir)) == 0o700 and mode(security) == 0o700
    files = list(security.glob("*.json"))
    assert any(f.name.endswith("-client.json") for f in files) and any(f.name.endswith("-engine.json") for f in files)
    assert all(mode(f) == 0o600 for f in files), {f.name: oct(mode(f)) for f in files}


def run_cli(*argv: str) -> tuple[int, str]:
    """The CLI in-process with a bare root logger, as a fresh `cluster` process has it: stdout + stderr."""
    root = logging.getLogger()
    saved = [
        (logger, logger.level, logger.handlers[:])
        for logger in (root, logging.getLogger("controller"), logging.getLogger("engines"))
    ]
    root.handlers = []  # pytest's capture handlers are put back below
    out, err = io.StringIO(), io.StringIO()
    try:
        code = main(list(argv), stdout=out, stderr=err)
    finally:
        for logger, level, handlers in saved:
            logger.setLevel(level)
            logger.handlers = handlers
    return code, out.getvalue() + err.getvalue()


def capture_keys(monkeypatch) -> list[str]:
    """The private key each start creates, read from its 0600 file (to look for it in the output)."""
    seen: list[str] = []
    original = network.key_pair

    def key_pair(*args):
        name, path = original(*args)
        seen.append(Path(path).read_text())
        return name, path

    monkeypatch.setattr(network, "key_pair", key_pair)
    return seen


def secrets_in(output: str, key: str) -> list[str]:
    body = [line for line in key.splitlines() if len(line) > 20 and "-----" not in line]
    found = [line for line in body if line in output]
    found += [word for word in ("PRIVATE KEY", "session-token-do-not-log") if word in output]
    return found

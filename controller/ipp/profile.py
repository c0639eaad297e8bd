"""A cluster's ipyparallel profile under state_dir, and what every engine of it starts with.

The profile holds ipyparallel's cluster file and the connection files (they carry the HMAC key: 0600 in a
0700 folder), so clusters with different state_dirs never see each other. No ipyparallel import here:
the tunnel holder and the providers read these names without it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def engine_environment(threads: int) -> dict[str, str]:
    """The environment of a local engine: its torch threads, and this checkout's code on its path."""
    env = {
        "OMP_NUM_THREADS": str(threads or ""),
        "MKL_NUM_THREADS": str(threads or ""),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
    }
    return {k: v for k, v in env.items() if v}


def profile_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "profile"


def url_file(profile: Path, cluster_id: str) -> Path:
    """The client connection file: a plain ``ipyparallel.Client(path)`` can use it."""
    return Path(profile) / "security" / f"ipcontroller-{cluster_id}-client.json"


def engine_file(profile: Path, cluster_id: str) -> Path:
    return Path(profile) / "security" / f"ipcontroller-{cluster_id}-engine.json"


LOOPBACK = "127.0.0.1"
EVERY_INTERFACE = ("0.0.0.0", "*", "::")


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("localhost", "::1")


HEARTBEAT_MS = 800
# an engine checks for the hub's pings every period + 500 ms (ipyparallel's IPEngine.start_heartbeat)
ENGINE_CHECK_MS = HEARTBEAT_MS + 500


def grace_args(master_grace_minutes: float) -> list[str]:
    """How long an engine waits for a silent controller before it quits: ``[cluster] master_grace_minutes``.

    ipyparallel's engine gives up after 50 missed checks (about 65 s at our heartbeat): a laptop that
    sleeps longer would lose every remote engine.  With the grace, engines wait, and carry on when
    the controller answers again; past it they quit, so a master that never comes back does not keep
    slaves busy for ever.
    """
    misses = max(1, math.ceil(master_grace_minutes * 60_000 / ENGINE_CHECK_MS))
    return [f"--IPEngine.max_heartbeat_misses={misses}"]


# every engine (local: this checkout on its path; remote: the engines package uploaded by bootstrap) leaves
# at once when stopped, and begins importing torch as soon as it registered: engines/process/startup.py;
# __import__ leaves no name behind in the engine's namespace
ENGINE_STARTUP = "--IPEngine.startup_command=__import__('engines.process.startup').process.startup.install()"


def engine_args(master_grace_minutes: float) -> list[str]:
    """The arguments of every engine, local or remote.  Passed again by each start of a local engine set: a
    Cluster rebuilt from its file (``load_cluster``, as `scale` and the keeper do) has lost the config."""
    return grace_args(master_grace_minutes) + [ENGINE_STARTUP]


def secure_files(profile: Path) -> None:
    """Connection and cluster files are 0600: the connection files carry the HMAC key."""
    security = Path(profile) / "security"
    if security.is_dir():
        os.chmod(security, 0o700)
        for path in security.iterdir():
            os.chmod(path, 0o600)

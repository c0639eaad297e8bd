"""Local processes of a cluster: the markers in their environment, liveness, clean-up.

Every local process a cluster starts (controller, engines, tunnel holders) carries
the markers below in its environment, so none can be orphaned unseen and a pid is
only ever signalled while it is still ours (pids are reused).  No ipyparallel here:
leases and sweep records ask whether a pid lives without importing it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

PROCESS_MARKER = "CLUSTER_PROFILE_DIR"  # the state_dir's profile that started it
CLUSTER_MARKER = "CLUSTER_IPP_ID"  # which cluster of that state_dir


def process_marker(profile: Path, cluster_id: str) -> dict[str, str]:
    return {PROCESS_MARKER: str(profile), CLUSTER_MARKER: cluster_id}


def pid_alive(pid: Optional[int]) -> bool:
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def kill_process_group(pid: int, grace: float = 5.0) -> None:
    """SIGTERM a launcher's process group (it started it as a new session), then SIGKILL.

    Never our own group: a pid that was reused by the caller's shell must not take it down.
    """
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    if pgid == os.getpgrp():
        log.warning("not signalling process group %d: it is this process's own", pgid)
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)


# a process caught in exec shows an empty environment until the kernel has written the new one: right after
# Popen returned (exec had closed the fds), 1085 of 2000 `sleep`s read empty on a loaded 2-core machine
MID_EXEC_WAIT_S = 0.5


def process_environment(pid: int) -> dict[str, str]:
    """The environment ``pid`` started with; read again for a moment while it is empty (a process in exec).
    Kernel threads have none at all, and are not waited for."""
    deadline = time.monotonic() + MID_EXEC_WAIT_S
    while True:
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return {}
        if raw or _kernel_thread(pid) or time.monotonic() > deadline or not pid_alive(pid):
            break
        time.sleep(0.002)
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _kernel_thread(pid: int) -> bool:
    """kthreadd (pid 2) and its children: no environment, ever."""
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return True  # gone: nothing to wait for
    return pid == 2 or parent == 2


def is_marked(pid: Optional[int], profile: Optional[Path] = None, cluster_id: Optional[str] = None) -> bool:
    """A live process started by this tool (for this profile / cluster, when given)?"""
    if pid is None or not pid_alive(pid):
        return False
    environ = process_environment(pid)
    if PROCESS_MARKER not in environ:
        return False
    if profile is not None and environ[PROCESS_MARKER] != str(profile):
        return False
    return cluster_id is None or environ.get(CLUSTER_MARKER) == cluster_id


def marked_processes(profile: Path, cluster_id: Optional[str] = None) -> list[int]:
    """Pids of live processes started for this profile (and cluster, when given), via the markers."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit()
        and int(entry.name) != os.getpid()
        and is_marked(int(entry.name), Path(profile), cluster_id)
    ]


def kill_cluster_processes(profile: Path, cluster_id: str) -> None:
    for pid in marked_processes(profile, cluster_id):
        if pid_alive(pid):
            kill_process_group(pid)


def process_identity(pid: int) -> str:
    """``boot_id:start_ticks`` of a live process, '' when it is gone (the same pid later names another)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # field 22 (starttime), counted after the command name, which may itself hold spaces and ')'
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"

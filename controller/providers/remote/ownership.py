"""Whose engines run in a slave's run dir, and stopping them.

Engines run in their own session (``setsid nohup``), so they outlive the SSH session; their pids are in pid
files in the cluster's run dir on the slave, so a stop finds them even when the master lost its local
state. The run dir also records which cluster (state dir and controller) its engines serve, so that two
clusters of one name on one master never stop each other's engines.
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from controller.errors import ProviderError
from controller.ipp.processes import process_identity
from controller.providers.remote.transport import SshConnection, resolve_dir

log = logging.getLogger(__name__)


def run_dir(base: str, tag: str) -> str:
    return f"{base}/run/{tag}"


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
  left=; for pid in $pids; do
    [ -d /proc/$pid ] && [ "$(cut -d' ' -f3 /proc/$pid/stat 2>/dev/null)" != Z ] && left="$left $pid"
  done
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


def _stop(remote: SshConnection, base: str, tag: str, pids: tuple[int, ...] = (), run_dir_too: bool = True) -> Stopped:
    """``run_dir_too``: the engines its pid files name as well, and the run dir removed afterwards."""
    known = " ".join(str(int(p)) for p in pids)
    script = STOP_SCRIPT.format(
        rundir=shlex.quote(run_dir(base, tag)),
        profile=shlex.quote(f"{base}/profile"),
        known=known,
        pid_files='"$dir"/engine-*.pid' if run_dir_too else "/dev/null",
        cleanup='rm -rf "$dir"' if run_dir_too else "true",
    )
    _, out, _ = remote.run(f"sh -c {shlex.quote(script)}", timeout=60)

    def listed(prefix: str) -> list[int]:
        return [int(p) for line in out.splitlines() if line.startswith(prefix) for p in line[len(prefix) :].split()]

    return Stopped(found=listed("found:"), left=listed("left:"))


def stop_engines(
    remote: SshConnection, remote_dir: str, tag: str, pids: tuple[int, ...] = (), owner: str = ""
) -> list[int]:
    """Stop the engines of ``tag`` on this slave (pid files, plus pids the store knows), remove its run dir.
    When the run dir is another running cluster's (``owner``: this cluster, as ``owner_of`` writes it), only
    the pids the store knows are stopped, and the run dir stays.

    Returns the pids still alive afterwards (nothing, normally)."""
    base = resolve_dir(remote, remote_dir)
    other = other_live_owner(remote, base, tag, owner)
    if other is not None:
        log.info(
            "%s: %s is another running cluster's (controller pid %d, state_dir %s): only this cluster's "
            "recorded engines are stopped there",
            remote.host,
            run_dir(base, tag),
            other.controller_pid,
            other.state_dir,
        )
    return _stop(remote, base, tag, pids, run_dir_too=other is None).left


OWNER = "owner"  # in a run dir: the cluster its engines serve (state dir, controller), as ``owner_of`` wrote it


def owner_of(controller_pid: Optional[int], state_dir: Path) -> str:
    """The cluster a run dir's engines serve, as the run dir records it: the master's state dir, and its
    controller (pid and that process's identity on this master: the tag names the master's host)."""
    return json.dumps(
        {
            "state_dir": str(Path(state_dir).resolve()),
            "controller_pid": controller_pid or 0,
            "identity": process_identity(controller_pid) if controller_pid else "",
        }
    )


@dataclass(frozen=True)
class OtherCluster:
    controller_pid: int
    state_dir: str


def other_live_owner(remote: SshConnection, base: str, tag: str, owner: str) -> Optional[OtherCluster]:
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


def refuse_a_live_owner(remote: SshConnection, base: str, tag: str, owner: str) -> None:
    """The run dir is another live cluster's: its engines are not leftovers, and stopping them would end that
    cluster's work."""
    rundir = run_dir(base, tag)
    other = other_live_owner(remote, base, tag, owner)
    if other is not None:
        raise ProviderError(
            f"{remote.host}: {rundir} holds the engines of another cluster of this master that is still running "
            f"(its controller, pid {other.controller_pid}, of the state_dir {other.state_dir}, with the same "
            f"[cluster] name): stop that cluster first (`cluster stop` with its configuration), or give this one "
            f"another [cluster] name"
        )


def stop_leftovers(remote: SshConnection, base: str, tag: str) -> None:
    """Before a bootstrap starts engines: stop those an earlier start of this cluster left in its run dir (a
    slave that was lost and came back, a master that lost its state dir). They wait for their old controller
    for up to master_grace_minutes, holding their GPU all that time."""
    stopped = _stop(remote, base, tag)
    if stopped.found:
        log.warning(
            "%s: stopped %d engine(s) an earlier start of this cluster left running (pids %s)",
            remote.host,
            len(stopped.found),
            " ".join(map(str, stopped.found)),
        )
    if stopped.left:
        raise ProviderError(
            f"{remote.host}: engines left by an earlier start of this cluster (pids "
            f"{' '.join(map(str, stopped.left))}) did not stop; stop them there and start again"
        )

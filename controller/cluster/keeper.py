"""The keeper's process: started, revived and stopped from here; its loop is controller/cluster/keeper_loop.py.

The keeper is a small background process per cluster that holds it to its target size. ``cluster start``
spawns it (``python -m controller.cluster.keeper_loop``) when ``[cluster] replace_lost`` or
autoscaling (``max_slaves`` > 0) is on.  It carries the cluster's process marker like the controller and
the engines, so ``cluster stop`` and the tests' leak checks find it; its pid is in the store; it ends by
itself once the controller is gone or the cluster is stopping; it logs to ``state_dir/keeper-<id>.log``.

"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

from controller.config import Config, config_from_dict, config_to_dict
from controller.ipp import processes
from controller.ipp.launch import controller_alive
from controller.ipp.profile import REPO_ROOT
from controller.store import ClusterRecord, Store

log = logging.getLogger(__name__)


def spawn(config: Config, record: ClusterRecord, store: Store) -> int:
    """Start the keeper of ``record`` in its own session and record its pid; returns the pid."""
    with _keeper_lock(Path(config.state_dir), record.id):
        return _spawn(config, record, store)


def revive(state_dir: Path, store: Store, record: ClusterRecord) -> Optional[int]:
    """Start the keeper of a running cluster again if it died (killed, out of memory); its pid, or None
    when there was nothing to do: no keeper wanted, still alive, or the cluster not running.

    The API calls it whenever it looks at a running cluster (status, and every command that talks to the
    controller), so a dead keeper costs at most the time until the next command. The spec ``spawn``
    wrote is the keeper's whole input, so the new one holds the cluster to the same knobs.
    """
    spec = Path(state_dir) / f"keeper-{record.id}.json"
    if not spec.exists():  # started without replace_lost or autoscaling: no keeper wanted
        return None
    with _keeper_lock(Path(state_dir), record.id):
        record = store.clusters.get(record.id)
        if record.state != "running" or not controller_alive(record):
            return None  # the keeper ends with the cluster; stop or a dead controller is not its death
        if record.keeper_pid and processes.is_marked(
            record.keeper_pid, Path(record.profile_dir), record.ipp_cluster_id
        ):
            return None
        pid = _spawn(config_from_dict(json.loads(spec.read_text())["config"]), record, store)
        store.events.add(
            record.id, "keeper", f"the keeper (pid {record.keeper_pid}) had died; started it again (pid {pid})"
        )
        log.warning(
            "the keeper of cluster %s (pid %s) had died; started it again (pid %d)", record.id, record.keeper_pid, pid
        )
        return pid


def forget(state_dir: Path, cluster_id: int) -> None:
    """No keeper is wanted for this cluster any more (an adopting start without replace_lost or autoscaling):
    drop the spec ``revive`` would start one from."""
    (Path(state_dir) / f"keeper-{cluster_id}.json").unlink(missing_ok=True)


@contextlib.contextmanager
def _keeper_lock(state_dir: Path, cluster_id: int) -> Iterator[None]:
    """Held while a keeper is started and its pid recorded: two commands that find it dead at once start
    one, and a new keeper (its first look revives a dead one) never sees a pid not yet recorded."""
    with open(state_dir / f"keeper-{cluster_id}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _spawn(config: Config, record: ClusterRecord, store: Store) -> int:
    state_dir = Path(config.state_dir)
    spec = state_dir / f"keeper-{record.id}.json"
    fd = os.open(spec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"cluster_id": record.id, "config": config_to_dict(config)}, handle)
    env = {**os.environ, **processes.process_marker(Path(record.profile_dir), record.ipp_cluster_id)}
    with open(state_dir / f"keeper-{record.id}.log", "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "controller.cluster.keeper_loop", str(spec)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(REPO_ROOT),
            env=env,
        )
    store.clusters.update(record.id, keeper_pid=process.pid)
    log.info("keeper of cluster %s started (pid %d)", record.id, process.pid)
    return process.pid


def stop(record: ClusterRecord) -> None:
    """End the keeper before the cluster is torn down (it would replace the engines being stopped)."""
    if record.keeper_pid and processes.is_marked(record.keeper_pid, Path(record.profile_dir), record.ipp_cluster_id):
        processes.kill_process_group(record.keeper_pid)

"""Engines started on a slave: the master's ``engines`` package uploaded and its imports verified (or
installed) once, stamped, then engines started in the background against the controller.

A stamp on the slave records the sources and interpreter the last bootstrap verified: a slave started again,
or adopted after a master restart, starts its engines at once when the stamp matches.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shlex
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import engines
from controller.errors import ProviderError
from controller.providers.remote.ownership import OWNER, refuse_a_live_owner, run_dir, stop_leftovers
from controller.providers.remote.transport import SshConnection, resolve_dir

log = logging.getLogger(__name__)

ENGINES_PACKAGE = Path(engines.__file__).resolve().parent
# what an engine imports; checked on every slave before engines start
VERIFY_IMPORTS = "import engines, ipyparallel, torch, numpy; print(torch.__version__, torch.cuda.device_count())"
# the same modules, only looked for: what a slave verified before must still be installed
FIND_MODULES = (
    "import importlib.util as u; "
    "print(' '.join(m for m in ('engines', 'ipyparallel', 'torch', 'numpy') if u.find_spec(m) is None))"
)
# installed with the slave's own pip when the check fails (a DL AMI already has torch)
ENGINE_REQUIREMENTS = ("ipyparallel>=8.6", "numpy", "torch")


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
    # extra ipengine arguments (controller.ipp.profile.engine_args: the grace for a silent master, the startup command)
    args: tuple = ()
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


def engines_digest() -> str:
    """sha256 over the ``engines`` package's sources (names and contents): what a slave's stamp must match."""
    digest = hashlib.sha256()
    for path in engine_sources():
        digest.update(path.relative_to(ENGINES_PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


STAMP = "engines.stamp"  # under remote_dir: the sources and interpreter the last bootstrap verified


def stamp_for(spec: EngineSpec, torch_version: str, gpus: int) -> dict:
    return {"sources": engines_digest(), "python": spec.python, "torch": torch_version, "gpus": gpus}


def stamped(remote: SshConnection, spec: EngineSpec) -> Optional[tuple[str, dict]]:
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
        "sources": engines_digest(),
        "python": spec.python,
    }:
        return None
    # found, not imported: milliseconds, where the import check takes seconds (torch); and the GPUs the driver
    # shows, so that a GPU gone (or added) since is counted again by torch, in a full bootstrap
    status, out, _ = remote.run(
        f"ls -d /dev/nvidia[0-9]* 2>/dev/null | wc -l; cd {q(base)} && "
        f"PYTHONPATH={q(base)}/src {q(spec.python)} -c {q(FIND_MODULES)}",
        check=False,
    )
    device_files, _, missing = out.strip().partition("\n")
    if status != 0 or missing.strip():
        log.info(
            "%s: %s since the last bootstrap",
            remote.host,
            f"{missing.strip()} missing" if status == 0 else "its python does not run",
        )
        return None
    if device_files.strip().isdigit() and int(device_files) != int(stamp.get("gpus") or 0):
        log.info(
            "%s: %s GPU device(s) where the last bootstrap counted %s",
            remote.host,
            device_files.strip(),
            stamp.get("gpus"),
        )
        return None
    return base, stamp


def start_on_slave(
    remote: SshConnection, spec: EngineSpec, cancelled: Optional[threading.Event] = None
) -> Bootstrapped:
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
    refuse_a_live_owner(remote, base, spec.tag, spec.owner)
    stop_leftovers(remote, base, spec.tag)
    if cancelled is not None and cancelled.is_set():
        raise ProviderError(f"{remote.host}: start cancelled before engines were started")
    pids = start_engines(remote, base, spec, spec.engines or spec.engines_per_gpu * max(gpus, 1), gpus, f"{base}/src")
    return Bootstrapped(
        hostname=hostname.strip(), gpus=gpus, pids=pids, remote_dir=base, torch=str(stamp.get("torch", ""))
    )


def bootstrap(remote: SshConnection, spec: EngineSpec) -> tuple[str, dict]:
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
        log.info(
            "%s: engine environment incomplete (%s); installing %s",
            remote.host,
            err.strip().splitlines()[-1:] or "?",
            ", ".join(ENGINE_REQUIREMENTS),
        )
        remote.run(f"{python} -m pip install -q --user " + " ".join(q(r) for r in ENGINE_REQUIREMENTS), timeout=1800)
        status, out, err = remote.run(verify, check=False)
    if status != 0:
        raise ProviderError(
            f"{remote.host}: the engine environment does not work with {python}: {(err.strip() or out.strip())[-1500:]}"
        )
    torch_version, _, gpu_text = out.strip().splitlines()[-1].partition(" ")
    stamp = stamp_for(spec, torch_version, int(gpu_text or 0))
    remote.put(json.dumps(stamp).encode(), f"{base}/{STAMP}", mode=0o600)
    return base, stamp


def start_engines(remote: SshConnection, base: str, spec: EngineSpec, count: int, gpus: int, src: str) -> list[int]:
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
        engine = (
            f"{q(spec.python)} -m ipyparallel.engine --file={q(connection)} "
            f"--profile-dir={q(base)}/profile" + "".join(f" {q(a)}" for a in spec.args)
        )
        # setsid: its own session and process group, so it survives this SSH session and
        # stop can signal the whole group; the pid file lets stop find it without local state
        # a simple command in the background (not an && list: that would background a subshell
        # holding the SSH channel open, and $! would not be the engine)
        command = (
            f"cd {q(base)} || exit 1; {assignments} setsid nohup {engine} "
            f"> {q(rundir)}/engine-{index}.log 2>&1 < /dev/null & "
            f"echo $! > {q(rundir)}/engine-{index}.pid; echo $!"
        )
        _, out, _ = remote.run(command)
        pids.append(int(out.strip().splitlines()[-1]))
    log.info("%s: started %d engine(s), pids %s", remote.host, count, pids)
    return pids

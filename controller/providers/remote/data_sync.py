"""Data sets from the master's data_dir to a slave's over SFTP, file by file, checked by sha256 on arrival."""

from __future__ import annotations

import hashlib
import logging
import posixpath
import shlex
from pathlib import Path

from controller.errors import ProviderError
from controller.providers.remote.transport import SshConnection, resolve_dir
from engines.spec import dataset_files

log = logging.getLogger(__name__)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def remotesha256_of(remote: SshConnection, paths: list[str]) -> dict[str, str]:
    if not paths:
        return {}
    _, out, _ = remote.run("sha256sum " + " ".join(shlex.quote(p) for p in paths) + " 2>/dev/null", check=False)
    found = {}
    for line in out.splitlines():
        digest, _, name = line.partition("  ")
        found[name] = digest
    return found


def sync_data(remote: SshConnection, master_data_dir: Path, slave_data_dir: str) -> list[str]:
    """Fill the slave's data_dir from the master's over SFTP: files missing there or different are copied
    to a temporary name, their sha256 checked on the slave, then renamed.  Returns what was copied.

    Nothing to copy when the master has no data set: the engines then download it themselves (only
    with ``download = true``)."""
    files = dataset_files(master_data_dir)
    base = resolve_dir(remote, slave_data_dir)
    if not files:
        return []
    wanted = {rel: sha256_of(path) for rel, path in files.items()}
    have = remotesha256_of(remote, [f"{base}/{rel}" for rel in files])
    copy = [rel for rel in files if have.get(f"{base}/{rel}") != wanted[rel]]
    if not copy:
        return []
    folders = sorted({posixpath.dirname(f"{base}/{rel}") for rel in copy})
    remote.run("mkdir -p " + " ".join(shlex.quote(f) for f in folders))
    for rel in copy:
        remote.upload(files[rel], f"{base}/{rel}.part", mode=0o600)
    arrived = remotesha256_of(remote, [f"{base}/{rel}.part" for rel in copy])
    bad = [rel for rel in copy if arrived.get(f"{base}/{rel}.part") != wanted[rel]]
    if bad:
        raise ProviderError(
            f"{remote.host}: {', '.join(bad)} arrived in {base} with another sha256 than the "
            f"master's copy in {master_data_dir}; check the slave's disk"
        )
    remote.run("; ".join(f"mv -f {shlex.quote(f'{base}/{rel}.part')} {shlex.quote(f'{base}/{rel}')}" for rel in copy))
    log.info("%s: copied %s into %s (sha256 checked)", remote.host, ", ".join(copy), base)
    return copy

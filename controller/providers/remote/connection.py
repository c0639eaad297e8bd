"""Where the controller's engine ports are and how each slave reaches them: the engine connection file as
one slave must see it (directly, or through its ends of the SSH reverse tunnels), and the master's address
toward the slaves."""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from controller.errors import ProviderError
from controller.ipp.profile import engine_file, is_loopback
from controller.store import ClusterRecord

log = logging.getLogger(__name__)

# the controller's engine-facing ports in an ipyparallel engine connection file
ENGINE_PORT_KEYS = ("registration", "control", "mux", "task", "iopub", "hb_ping", "hb_pong", "broadcast")


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
    for key in ENGINE_PORT_KEYS if ports is not None else ():
        value = copy.get(key)
        if isinstance(value, int):
            copy[key] = ports[value]  # type: ignore[index]  # the loop runs only with ports
        elif isinstance(value, list):
            copy[key] = [ports[int(v)] for v in value]  # type: ignore[index]  # as above
    copy["interface"] = f"tcp://{controller_address}"
    copy["location"] = controller_address
    copy.pop("ssh", None)
    return copy


def local_addresses() -> list[ipaddress.IPv4Interface]:
    """The master's IPv4 interface addresses (empty when ``ip`` is not there: then nothing is 'local')."""
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            found.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]))
    return found


def source_address(host: str, port: int = 22) -> str:
    """The master's address on the interface its routes use to reach ``host`` ('' if none; sends nothing)."""
    try:
        family, kind, proto, _, target = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(target)
            return probe.getsockname()[0]
    except OSError:
        return ""


def engine_address(sources: list[str]) -> str:
    """Where the controller's engine ports listen: the one address every slave is reached from.

    Slaves behind different interfaces leave only every interface (0.0.0.0, client
    ports included: they share the registration port); the controller then requires
    CurveZMQ (controller.ipp.launch), as it does for any address beyond loopback.
    """
    found = set(sources)
    if len(found) == 1 and "" not in found:
        return found.pop()
    log.warning(
        "the slaves are reached from %s: the controller listens on every interface, CurveZMQ-encrypted "
        "(tunnel = always, or slaves behind one interface, keep it to one address)",
        ", ".join(sorted(a or "no route" for a in found)),
    )
    return "0.0.0.0"


def engine_connection(cluster: ClusterRecord, timeout: float) -> dict:
    """The controller's engine connection file, once it has written it (it does so after starting)."""
    path = engine_file(Path(cluster.profile_dir), cluster.ipp_cluster_id)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            if time.monotonic() > deadline:
                raise ProviderError(
                    f"the controller wrote no engine connection file {path} within {timeout:.0f} s"
                ) from None
            time.sleep(0.1)


def tunnelled(connection: dict) -> bool:
    """Engines reach this controller only through SSH reverse tunnels: its engine ports are on loopback."""
    return is_loopback(str(connection.get("interface", "")).split("://")[-1])

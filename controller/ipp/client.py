"""The master's ipyparallel client of a cluster: connecting, what the controller says is busy or idle, and
confirming that engine output reaches the client (ZeroMQ's PUB drops what it sends before a subscription
lands)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import ipyparallel as ipp

log = logging.getLogger(__name__)


def connect_client(url: Path, timeout: float = 10) -> ipp.Client:
    if not Path(url).is_file():
        raise FileNotFoundError(f"connection file {url} is missing: the controller is not running")
    # positional: ipyparallel 9 ignores the url_file= keyword and falls back to the default profile
    return ipp.Client(str(url), timeout=timeout)


def holds_task(queue: dict) -> bool:
    """Whether an engine's entry of ``Client.queue_status()`` shows a task running or queued on it."""
    return bool(queue.get("tasks") or queue.get("queue"))


def busy_engines(client: ipp.Client) -> set[int]:
    """The engines that run or hold a task now, as the controller sees them."""
    return {engine for engine, queue in client.queue_status().items() if isinstance(engine, int) and holds_task(queue)}


def idle_engines(client: ipp.Client) -> list[int]:
    """The engines registered with ``client`` that have nothing queued or running, as the controller sees now."""
    queues, registered = client.queue_status(), set(client.ids)
    return sorted(engine for engine, queue in queues.items() if engine in registered and not holds_task(queue))


def confirm_output(client: ipp.Client, targets: list[int], timeout: float) -> list[int]:
    """Make sure what each of ``targets`` prints and publishes reaches ``client``; return those unconfirmed.

    Engine output takes two ZeroMQ PUB/SUB links (engine to the controller's relay, relay to the client),
    and a PUB drops every message until the SUB's subscription has reached it. A client just connected, or
    an engine just registered, can therefore lose its first messages: among them the "idle" status that
    ``view.execute(block=True)`` and ``%px`` wait for with no timeout, so they hang for ever (1 in 50 new
    clients on an idle 2-core master, 4 in 100 on a loaded one). Nothing tells a SUB when it is subscribed,
    so each engine runs empty cells until one's status comes back; as each round sends a new cell, a request
    lost on its way (a ROUTER drops what it has no connected peer for) is made good too. Call it for idle
    engines only: a cell queues behind a running task. An engine that leaves meanwhile is neither confirmed
    nor returned.
    """
    confirmed, gone = _run_cells_until_output(client, targets, timeout, enough=len(targets))
    unconfirmed = sorted(set(targets) - confirmed - gone)
    if unconfirmed:
        log.warning(
            "no output of engine(s) %s reached the master within %g s; what they print may be lost",
            unconfirmed,
            timeout,
        )
    return unconfirmed


def silence_report(client: ipp.Client, engines: list[int], timeout: float = 5.0) -> str:
    """What the controller says of ``engines`` that ``client`` hears nothing from: their queues as the hub
    counts them (work done there means replies were lost on the way), or that the hub does not answer this
    client either (then the client's own connection is what is broken)."""
    answer: dict = {}
    asking = threading.Thread(target=lambda: answer.update(queues=client.queue_status()), daemon=True)
    asking.start()
    asking.join(timeout)
    io_thread = getattr(client, "_io_thread", None)
    io = "" if io_thread is None or io_thread.is_alive() else "; the client's IO thread has ended"
    if "queues" not in answer:
        return f"the controller did not answer this client within {timeout:g} s either{io}"
    queues = answer["queues"]
    return (
        "the controller counts "
        + "; ".join(
            f"engine {engine}: "
            + (
                ", ".join(
                    f"{key} {len(value) if isinstance(value, list) else value}"
                    for key, value in sorted(queues[engine].items())
                )
                if engine in queues
                else "not registered"
            )
            for engine in engines
        )
        + io
    )


def confirm_client_output(client: ipp.Client, timeout: float) -> bool:
    """Make sure a client just connected gets engine output: its own link to the relay is confirmed once any
    idle engine's empty cell reports back (each engine's link was confirmed when it joined, by
    ``confirm_output``). False if no engine is idle, or none reported within ``timeout``."""
    idle = idle_engines(client)[:4]  # one answer is enough; a few in case one is frozen
    confirmed, gone = _run_cells_until_output(client, idle, timeout, enough=1)
    if idle and not confirmed and set(idle) - gone:
        log.warning("no engine output reached this client within %g s; what engines print may be lost", timeout)
    return bool(confirmed)


def _run_cells_until_output(
    client: ipp.Client, targets: list[int], timeout: float, enough: int
) -> tuple[set[int], set[int]]:
    """Run empty cells on ``targets`` until ``enough`` of them have had a cell's output arrive, or ``timeout``
    is up. Returns (those confirmed, those that left the cluster meanwhile). A lost cell's output never
    comes, so each round sends a new cell and waits on it a little longer than the last."""
    deadline = time.monotonic() + timeout
    cells: dict[int, list] = {engine: [] for engine in targets}
    confirmed: set[int] = set()
    gone: set[int] = set()
    patience = 0.1
    while cells and len(confirmed) < enough and time.monotonic() < deadline:
        for engine in list(cells):
            try:
                cells[engine].append(client[engine].execute("", silent=True, block=False))
            except IndexError:  # unregistered since: ipyparallel has no such engine any more
                gone.add(engine)
                del cells[engine]
        for engine in list(cells):
            cells[engine][-1].wait_for_output(max(0.0, min(patience, deadline - time.monotonic())))
            if any(cell.wait_for_output(0) for cell in cells[engine]):
                confirmed.add(engine)
                del cells[engine]
                if len(confirmed) >= enough:
                    break
        patience = min(2 * patience, 2.0)
    return confirmed, gone

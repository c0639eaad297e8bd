"""Spot interruption notices: a watcher thread on the engine polling the instance metadata service.

EC2 announces that it takes a spot instance back two minutes ahead at
``/latest/meta-data/spot/instance-action`` (404 until then), and that it is likely to soon at
``/latest/meta-data/events/recommendations/rebalance``.  Both are read with IMDSv2: a session token
from ``PUT /latest/api/token`` (``X-aws-ec2-metadata-token-ttl-seconds``), sent with every GET as
``X-aws-ec2-metadata-token``.  On either, the engine asks its running task to stop at the next batch
boundary with a checkpoint (``stopping.request("notice")``, sticky: later tasks hand theirs back at
once), and the master moves the run elsewhere.  ``[cluster] metadata_url`` points the watcher at any
service that speaks this (tests play notices with a local HTTP server).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Optional

from engines.process import stopping

log = logging.getLogger(__name__)

TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_S = 21600  # IMDSv2's longest session; renewed a minute before it runs out
NOTICES = {  # what the notice is called in the log -> where it appears
    "spot interruption notice": "/latest/meta-data/spot/instance-action",
    "rebalance recommendation": "/latest/meta-data/events/recommendations/rebalance",
}
POLL_S = 1.0
REQUEST_TIMEOUT_S = 2.0


@dataclass
class Watcher:
    """Polls ``url`` every ``interval`` seconds and calls ``on_notice(name, body)`` for each notice it sees."""

    url: str
    interval: float = POLL_S
    on_notice: Callable[[str, str], None] = field(default=lambda name, body: stopping.request(stopping.NOTICE))
    clock: Callable[[], float] = time.monotonic
    _token: Optional[str] = field(default=None, init=False)
    _token_until: float = field(default=0.0, init=False)
    _seen: set = field(default_factory=set, init=False)
    _failing: bool = field(default=False, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: Optional[threading.Thread] = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        # no proxy: the metadata service is link-local, and a proxy would answer for another machine
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        # the service logs who asked; a test's server also tells the engines on one host apart by it
        self._agent = f"cluster-engine/{socket.gethostname()}/{os.getpid()}"

    def check(self) -> list[str]:
        """One poll: the notices seen for the first time (each also goes to ``on_notice``)."""
        found = []
        for name, path in NOTICES.items():
            body = self._get(path)
            if body is not None and name not in self._seen:
                self._seen.add(name)
                found.append(name)
                log.warning(
                    "%s from %s: %s; the running task stops at its next batch with a checkpoint",
                    name,
                    self.url,
                    body.strip()[:200],
                )
                self.on_notice(name, body)
        return found

    def _get(self, path: str) -> Optional[str]:
        """The body at ``path``, or None when there is nothing there (404)."""
        for attempt in range(2):
            request = urllib.request.Request(
                self.url + path, headers={"X-aws-ec2-metadata-token": self._session_token(), "User-Agent": self._agent}
            )
            try:
                with self._opener.open(request, timeout=REQUEST_TIMEOUT_S) as response:
                    return response.read().decode("utf-8", "replace")
            except urllib.error.HTTPError as error:
                if error.code == 404:
                    return None
                if error.code == 401 and attempt == 0:  # the token expired or the service restarted
                    self._token = None
                    continue
                raise
        return None

    def _session_token(self) -> str:
        if self._token is None or self.clock() >= self._token_until:
            request = urllib.request.Request(
                self.url + TOKEN_PATH,
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S), "User-Agent": self._agent},
            )
            with self._opener.open(request, timeout=REQUEST_TIMEOUT_S) as response:
                self._token = response.read().decode("ascii").strip()
            self._token_until = self.clock() + TOKEN_TTL_S - 60
        return self._token

    # the thread ----------------------------------------------------------------------
    def start(self) -> "Watcher":
        self._thread = threading.Thread(target=self._run, name="spot-notice-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=REQUEST_TIMEOUT_S * 3 + self.interval)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        # polling goes on after a notice: cheap, and the service's log then shows the engine took it in
        while not self._stop.is_set():
            try:
                self.check()
                if self._failing:
                    log.info("the metadata service at %s answers again", self.url)
                    self._failing = False
            except (OSError, ValueError) as error:  # unreachable, refused, timed out, a bad answer
                if not self._failing:
                    log.warning(
                        "cannot read spot notices from %s (%s); trying again every %g s", self.url, error, self.interval
                    )
                    self._failing = True
            self._stop.wait(self.interval)


_lock = threading.Lock()
_watcher: Optional[Watcher] = None


def watch(url: str, interval: float = POLL_S) -> dict:
    """Watch ``url`` for notices from now on, in place of any earlier watcher of this process (the master
    calls this on every engine as it registers); returns what this engine now watches."""
    global _watcher
    with _lock:
        if (
            _watcher is not None
            and _watcher.running
            and (_watcher.url, _watcher.interval) == (url.rstrip("/"), interval)
        ):
            return status()
        if _watcher is not None:
            _watcher.stop()
        _watcher = Watcher(url, interval).start()
        return status()


def unwatch() -> None:
    global _watcher
    with _lock:
        if _watcher is not None:
            _watcher.stop()
            _watcher = None


def status() -> dict:
    watcher = _watcher
    return {"url": watcher.url if watcher else "", "running": bool(watcher and watcher.running), "pid": os.getpid()}

"""A local HTTP server that plays EC2's instance metadata service (IMDSv2) for spot-notice tests.

Like the real one it refuses a GET without a valid session token (401), answers 404 where there is no
notice, and serves a notice only once the test flips it on; a notice can be aimed at one engine process
(the watcher names its host and pid in its User-Agent).  Every request is recorded, so a test can wait
until an engine has *read* a notice and polled again, instead of sleeping.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from engines.process.notices import NOTICES, TOKEN_PATH

SPOT, REBALANCE = NOTICES["spot interruption notice"], NOTICES["rebalance recommendation"]


@dataclass
class Served:
    path: str
    agent: str
    status: int
    at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> Optional[int]:
        tail = self.agent.rsplit("/", 1)[-1]
        return int(tail) if tail.isdigit() else None


class FakeImds:
    def __init__(self) -> None:
        self.tokens: set[str] = set()
        self.notices: dict[str, Optional[int]] = {}  # path -> the pid it is for (None: every caller)
        self.served: list[Served] = []
        self.lock = threading.RLock()  # a handler answers while holding it
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # the test's output stays readable
                pass

            def do_PUT(self) -> None:
                if self.path != TOKEN_PATH or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._answer(400, "")
                token = secrets.token_urlsafe(16)
                with owner.lock:
                    owner.tokens.add(token)
                self._answer(200, token)

            def do_GET(self) -> None:
                with owner.lock:
                    if self.headers.get("X-aws-ec2-metadata-token") not in owner.tokens:
                        return self._answer(401, "")
                    aimed = self.path in owner.notices
                    target = owner.notices.get(self.path)
                agent = self.headers.get("User-Agent", "")
                if aimed and (target is None or agent.endswith(f"/{target}")):
                    body = (
                        json.dumps({"action": "terminate", "time": "2026-11-24T01:00:00Z"})
                        if self.path == SPOT
                        else json.dumps({"noticeTime": "2026-11-24T01:00:00Z"})
                    )
                    return self._answer(200, body)
                self._answer(404, "")

            def _answer(self, status: int, body: str) -> None:
                with owner.lock:
                    owner.served.append(Served(self.path, self.headers.get("User-Agent", ""), status))
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeImds":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def announce(self, path: str = SPOT, pid: Optional[int] = None) -> None:
        """From now on, ``path`` holds a notice (for the engine process ``pid`` only, when given)."""
        with self.lock:
            self.notices[path] = pid

    def expire_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    def requests(self, pid: Optional[int] = None) -> list[Served]:
        with self.lock:
            return [s for s in self.served if pid is None or s.pid == pid]

    def read_and_polled_again(self, pid: int, path: str = SPOT) -> bool:
        """The engine ``pid`` got the notice at ``path`` and has polled since: it has acted on it."""
        seen = self.requests(pid)
        got = [i for i, s in enumerate(seen) if s.path == path and s.status == 200]
        return bool(got) and any(s.path == path for s in seen[got[0] + 1 :])

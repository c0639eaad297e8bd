"""An engine told to stop (SIGTERM) leaves at once, without the interpreter's final clean-up.

Once ipyparallel's SIGTERM handler has stopped the engine's event loop, an engine that imported
torch spends seconds (measured: 3 to 6 s on a loaded 2-core machine, 0.9 s without torch) in
IPython's exit hooks and the interpreter's finalisation, freeing modules nobody will use again.
`cluster stop` and `cluster scale` down waited for that.  The engine has nothing left to save
at that point: its results went to the hub, the nanny tells the hub it is gone once the process
has, and our own log handlers are flushed here first.

Only a SIGTERM'd exit is cut short: an engine that ends any other way (a lost hub, a fatal error)
finalises as before and keeps its exit status.  Installed in every engine by its startup
command (engines/process/startup.py), after ipyparallel set its own SIGTERM handler.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys

_terminated = False


def install() -> bool:
    """Wrap the engine's SIGTERM handler; False (nothing done) when it has none to wrap."""
    stop = signal.getsignal(signal.SIGTERM)
    if not callable(stop):
        return False

    def on_terminate(signum, frame):
        global _terminated
        _terminated = True
        stop(signum, frame)

    signal.signal(signal.SIGTERM, on_terminate)
    # atexit runs hooks last-registered first: this one runs before IPython's (registered earlier)
    atexit.register(_leave_if_terminated)
    return True


def _leave_if_terminated() -> None:
    if not _terminated:
        return
    logging.shutdown()
    # the process's own streams (the engine's log file), not the kernel's: those wait for an IO thread
    # that may be gone already
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is None:  # a process started without one
            continue
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a stream closed already has nothing to flush
            pass
    os._exit(0)

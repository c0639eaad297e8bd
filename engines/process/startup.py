"""What an engine does the moment it has registered: leave fast when stopped, and import torch now.

Importing torch is most of what makes a new engine slow to be of use (2.5 s of CPU on an idle
machine; four engines at once on two cores at `cluster start`).  Training needs no more of torch than
that: engines/optim.py stands in for torch.optim, whose first optimizer would import torch._dynamo,
nearly as long again.  Until now the first task an engine
got (``engines.tasks.engine_info``) paid for it, and the master asks that only once every engine has
registered, so an engine that registered early sat idle while the others started, then all imported
together.  Here a background thread starts the import as soon as the engine runs its startup command
(ipyparallel runs it right after registration, before the kernel reads its first request), so the
import overlaps the other engines' start and the master's wait for them.

An engine's first task, ``engine_info`` (the master sends no other before it; ``warm_up`` for the
benchmarks that call it directly) first calls ``wait()``: the imports end in the thread that began
them, and no task imports torch's modules alongside the thread (two threads importing modules that
import each other can meet in the import locks, and one then sees a half-initialised module).  A failed background
import is only logged: the task's own import afterwards raises the real error where the master sees it.

Installed in every engine, local or remote, as its startup command (``controller.ipp.launch.ENGINE_STARTUP``).
A local engine is forked from its cluster's fork server (engines/process/forkserver.py) with these modules imported
already: there the thread finds them loaded and ends at once.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Optional

from engines.process import fast_exit

log = logging.getLogger(__name__)

# torch, and our training code (numpy, torch.nn, the model, engines/optim.py)
PRELOAD = ("torch", "engines.workloads.mnist")

_thread: Optional[threading.Thread] = None
_imported: list[str] = []  # what the background thread imported, in order


def install(modules: tuple[str, ...] = PRELOAD) -> None:
    """The startup command of a local engine: the fast exit, and the imports started in the background."""
    fast_exit.install()
    preload(modules)


def preload(modules: tuple[str, ...] = PRELOAD) -> bool:
    """Import ``modules`` in a background thread; False (nothing started) when one was started already."""
    global _thread
    if _thread is not None:
        return False
    _thread = threading.Thread(target=_import_all, args=(modules,), name="engine-preload", daemon=True)
    _thread.start()
    return True


def _import_all(modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
            _imported.append(name)
        except BaseException:  # noqa: BLE001 - the task's own import reports it to the master
            log.warning("engine startup could not import %s in advance", name, exc_info=True)


def wait() -> None:
    """Return once the background imports ended (at once when none was started, as in a plain engine)."""
    if _thread is not None:
        _thread.join()


def preloaded() -> dict:
    """Whether this engine started its imports at startup, and which ended: ``{"started", "imported"}``."""
    return {"started": _thread is not None, "imported": list(_imported)}

"""The master side: configuration, providers, the store, scheduling, the CLI and its Python API."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy, so `cluster --help` and config errors don't pay for importing torch and ipyparallel
    if name in ("Cluster", "ClusterStatus", "RunResult"):
        from controller import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["Cluster", "ClusterStatus", "RunResult", "__version__"]

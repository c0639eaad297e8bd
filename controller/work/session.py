"""What a subsystem (bench, sweep) needs of the cluster it works on: a narrow session, not the whole API.

``controller.api.Cluster`` satisfies :class:`Session` structurally and hands itself
over; the subsystems depend on this protocol only, so they never import the API
back (tests/test_imports.py keeps the module graph free of cycles), and a test can
give them any object with these few members.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import ipyparallel

    from controller.config import Config
    from controller.store import ClusterRecord, Store
    from controller.work.scheduler import Scheduler


class Session(Protocol):
    """A cluster as a runner sees it.

    ``store`` and ``config`` work with the cluster stopped (past sweeps, reports); every
    other member needs it running and raises NotRunningError (or ClusterStateError when
    its controller is gone) otherwise.
    """

    @property
    def name(self) -> str:
        """The cluster's [cluster] name, for messages."""

    @property
    def config(self) -> "Config":
        """The loaded configuration: runners read [training], [aws] region and state_dir."""

    @property
    def store(self) -> "Store":
        """The cluster's store: runs, epochs, checkpoints, and the subsystems' own tables."""

    @property
    def record(self) -> "ClusterRecord":
        """The running cluster's row: id, provider, slaves, threads per engine, $/hour."""

    @property
    def client(self) -> "ipyparallel.Client":
        """A connected client, for tasks sent to chosen engines (hardware info, data warm-up)."""

    def run_spec(self, **overrides: Any) -> dict:
        """[training] with ``overrides`` applied and validated, as the engines' RunSpec dict."""

    def engine_data_dir(self) -> str:
        """data_dir as the engines see it."""

    def scheduler(self, **options: Any) -> "Scheduler":
        """A scheduler on the cluster's engines (``targets``, ``prefetch``) that gives up when the cluster is lost."""

"""The exception tree, and the one place that maps exceptions to exit codes.

Everything below the CLI raises one of these; only ``controller.cli`` turns
them into a message and an exit status.
"""

from __future__ import annotations

import enum

from engines.spec import DataError


class ExitStatus(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2  # bad configuration, bad arguments: nothing was started
    CLUSTER_STATE = 3  # "already running", "not running"
    PROVIDER = 4  # the cloud or a slave said no
    INTERRUPTED = 130


class ClusterError(Exception):
    """Base of every error this tool raises on purpose."""

    exit_status = ExitStatus.ERROR


class ConfigError(ClusterError):
    """A configuration file, key, value or command-line argument is wrong."""

    exit_status = ExitStatus.USAGE


class UsageError(ConfigError):
    """A command-line argument is wrong."""


class ClusterStateError(ClusterError):
    """The cluster is not in the state the command needs."""

    exit_status = ExitStatus.CLUSTER_STATE


class NotRunningError(ClusterStateError):
    pass


class AlreadyRunningError(ClusterStateError):
    pass


class ClusterLostError(ClusterStateError):
    """Work cannot go on: the controller died, or no engine is left and none came within engine_timeout.

    ``way_on``: the commands that bring the cluster back, for the resume hints of train, sweep and bench."""

    def __init__(self, message: str, way_on: str = "`cluster stop`, `cluster start`"):
        super().__init__(message)
        self.way_on = way_on


# after the controller died: the slaves still up are adopted by a new one (controller/cluster/lifecycle.py)
CONTROLLER_GONE_WAY_ON = "`cluster start` (it adopts the slaves still up)"


class ProviderError(ClusterError):
    """A provider failed to start, reach or stop nodes."""

    exit_status = ExitStatus.PROVIDER


class CapacityError(ProviderError):
    """Not enough capacity: try another zone or instance type."""


class CredentialsError(ProviderError):
    """Missing or insufficient credentials: stop at once."""


class TaskError(ClusterError):
    """A task raised on an engine; carries the remote traceback."""

    def __init__(self, message: str, traceback: str = ""):
        super().__init__(message)
        self.traceback = traceback


# what the CLI reports as one line and its exit status: the tree above, and the data errors the
# engines share with the master (engines.spec.DataError: not a ClusterError, slaves have no controller)
REPORTED = (ClusterError, DataError)

__all__ = [
    "CONTROLLER_GONE_WAY_ON",
    "REPORTED",
    "AlreadyRunningError",
    "CapacityError",
    "ClusterError",
    "ClusterLostError",
    "ClusterStateError",
    "ConfigError",
    "CredentialsError",
    "DataError",
    "ExitStatus",
    "NotRunningError",
    "ProviderError",
    "TaskError",
    "UsageError",
]

"""The one error class the engines and the master share.

A slave has this package and no ``controller``, so the class lives here;
``controller.errors`` takes it into its tree (the CLI reports it as one line,
exit code 1). Nothing here imports torch: the master imports it for every command.
"""
from __future__ import annotations


class DataError(Exception):
    """A data set, a data file or a stored row is missing or malformed; the message names it."""

    exit_status = 1  # controller.errors.ExitStatus.ERROR (an int here: slaves cannot import controller)

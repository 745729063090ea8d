"""Errors that mean "the user's input is wrong", kept free of heavy imports so the CLI can
catch them without loading torch."""
from __future__ import annotations


class SweepError(ValueError):
    """A user mistake in a sweep file; the message is one line naming file and field.
    (Here, not in kdray/sweep.py, so the checks that raise it need not import the schema.)"""


class DataNotFoundError(FileNotFoundError):
    """The data set's files are not where the loader looked; the message says where."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "data not found"


class FetchError(RuntimeError):
    """A data set download that failed (unreachable, checksum differs); the message says which."""


class ClusterError(RuntimeError):
    """The Ray cluster cannot be joined or cannot run the sweep (resources it does not have)."""

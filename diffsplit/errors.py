"""The exception types for mistakes a user can fix.

The CLI renders a :class:`UserError` as a single line ``error: <message>`` on stderr and exits with
status 2. Anything else is a bug and keeps its traceback.

Under ``accelerate launch`` every process checks the same flags, files and folders before any work, so such
an error is printed by the main process alone (the others exit with status 2 silently); a
:class:`DataError` is found by reading data a single process may be the only one to read (a shard, a row),
so the process that meets it prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix: a bad flag, a bad data row, a missing model, a stale cache.

    The message must name the flag, row or file at fault, in one line.
    """


class DataError(UserError):
    """A problem found while reading data during a run (a corrupt shard, an image that will not decode),
    possibly in one process only: that process reports it."""


class StoppedElsewhere(UserError):
    """Another process of the run met a :class:`DataError` and reported it; this one stops without a word
    (the user hears of it once)."""


class BadSampleError(DataError):
    """A data row that cannot be used, found late (its image's header parsed but its body does not decode).

    Attributes:
        row: the row number in its source (from 1); ``path``: the file at fault; ``reason``: why, one line.
    """

    def __init__(self, message: str, row: int, path: str | Path, reason: str) -> None:
        super().__init__(message)
        self.row, self.path, self.reason = row, str(path), reason

    def record(self) -> dict[str, object]:
        """The ``skipped_samples.json`` entry of this row."""
        return {"row": self.row, "path": self.path, "reason": self.reason}


def load_or_error(load: Callable[[int], dict], index: int) -> dict:
    """``{"values": load(index)}``, or ``{"error": message}`` for a mistake the user can fix.

    A DataLoader worker hands its exception to the main process wrapped in a multi-line report; returning
    the message instead lets the main process raise it as the one line the user is promised.
    """
    try:
        return {"values": load(index)}
    except UserError as error:
        return {"error": str(error)}

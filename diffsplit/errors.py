"""The one exception type for mistakes a user can fix.

The CLI renders a :class:`UserError` as a single line ``error: <message>`` on stderr and exits with
status 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: a bad flag, a bad data row, a missing model, a stale cache.

    The message must name the flag, row or file at fault, in one line.
    """

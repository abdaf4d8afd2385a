"""The one exception type for a user's mistake (wrong path, mismatched inputs, missing extra).

The CLI prints its message without a traceback and exits 2 (`--debug` shows the traceback);
any other exception is an internal error and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message must say what to do next."""

"""One exception type for mistakes a user can fix.

The CLI turns a ``UserError`` into a one-line message and exit code 2; any
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or an impossible setting: shown to the user as one line."""

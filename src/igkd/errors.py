"""Errors a user can cause and fix.

Library code raises :class:`UserError` with one line that says what is wrong and how to
fix it; the command line prints it as ``igkd: error: ...`` and exits with status 2.
"""


class UserError(Exception):
    """A problem with the user's input (path, spec, value, store), not a bug."""

    exit_code = 2

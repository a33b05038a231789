"""Errors a user can cause and fix.

Library code raises :class:`UserError` with one line that says what is wrong and how to
fix it; the command line prints it as ``igkd: error: ...`` and exits with status 2.
"""


class UserError(Exception):
    """A problem with the user's input (path, spec, value, store), not a bug."""

    exit_code = 2


def cause(e: BaseException, limit: int = 200) -> str:
    """``Type: last line of the message`` of an exception raised by a user's model or a
    runtime, for a one-line error: TorchScript's and ONNX Runtime's first lines say only that
    an operation failed, and their last often repeats the type."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or ["no message"]
    name = type(e).__name__
    return f"{name}: {lines[-1].removeprefix(f'{name}: ')[:limit]}"

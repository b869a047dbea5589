"""User-facing errors.

Anything a user can cause (a bad recipe, a missing file, a corrupt checkpoint) raises `UserError`.
The CLI prints it as one line and exits with status 2; it never shows a traceback for these.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; printed as one line, exit status 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        # One line per problem, whatever whitespace the caller wrote.
        self.message = "\n".join(" ".join(line.split()) for line in message.splitlines() if line.strip())


class TrainingStopped(Exception):
    """The run stopped on purpose (NaN, signal) after saving what it could; carries the exit status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

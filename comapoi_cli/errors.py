"""The one exception type that reaches users as a sentence instead of a traceback."""

from __future__ import annotations


class ComapoiError(Exception):
    """An error the user can act on.

    The CLI prints ``str(error)`` (one clear sentence, optionally followed by a hint on the
    next line) and exits with ``exit_code``. Services raise it; they never print.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(ComapoiError):
    """A bad flag or a bad combination of flags (exit code 2, like click's own usage errors)."""

    exit_code = 2


class DataError(ComapoiError):
    """Input data that cannot be used (missing file, nothing left after cleaning, a record that fails a check set to 'fail')."""


class TrainingError(ComapoiError):
    """A training run that cannot start or could not finish (out of memory, no token carries loss, ...)."""


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of what ``exc`` says, stripped; ``default`` (else the exception's type name) when it says nothing."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if default is None else default

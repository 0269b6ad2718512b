"""The exit codes of `python -m concierge`, and the one-line failure that ends a command."""

from __future__ import annotations

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "Failure"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class Failure(Exception):
    """A one-line error for the user, with the exit code it ends the command with."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code

"""One exception type for everything a user can fix; the CLI prints it as one line."""

from __future__ import annotations


class RecuError(Exception):
    """A problem with the user's input or environment, worded as 'what is wrong; what to do'.

    exit_code 2 is for usage/input errors, 1 for runtime failures (docs/usage.md, "What
    happens when things go wrong").
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def few(keys: list[str], n: int = 3) -> str:
    """The first n names and an ellipsis: error lines stay one line."""
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")

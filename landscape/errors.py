"""The one exception type that carries a message meant for the user.

Library code raises :class:`LandscapeError` for bad input (a corrupt file, a wrong key, a
shape mismatch, empty data...). The command line prints ``str(err)`` as a single line and
exits with code 2; any other exception is a bug in ``landscape`` and is reported as such.
"""

from __future__ import annotations


class LandscapeError(Exception):
    """A problem with the user's input: what is wrong, and how to fix it.

    >>> str(LandscapeError("no data", hint="pass --data"))
    'no data; pass --data'
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}; {self.hint}"

"""Error classes the command line tells apart, importable without loading torch or pydantic.

``BadInput``: what the user gave is wrong (config, data, model, run directory); ``zoctl``
prints the message on one line and exits 2. ``FetchError``: ``zoctl fetch`` could not
download (``unreachable``: the package registry could not be reached).
"""

from __future__ import annotations


class BadInput(ValueError):
    """Bad user input; the message names what is wrong and what is expected."""


class FetchError(RuntimeError):
    """A fetch that failed; ``unreachable`` when the package registry could not be reached."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def counted(n: int, noun: str) -> str:
    """``n`` and the noun in the number it needs, for messages: counted(1, "worker") == "1 worker",
    counted(2, "process") == "2 processes"."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}es" if noun.endswith(("s", "x", "sh", "ch")) else f"{n} {noun}s"

"""Errors users see as one clear line (the CLI prints ``str(err)`` and exits non-zero)."""

from __future__ import annotations

from pathlib import Path


def printable(name: str | Path) -> str:
    """A file name as shown to users: bytes that are not UTF-8 (surrogate-escaped by ``os.fsdecode``)
    appear as ``\\xNN`` escapes, so printing never fails and the name stays recognisable."""
    s = str(name)
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return s.encode("utf-8", "backslashreplace").decode("ascii")


class HaflocError(Exception):
    """Base class of every error hafloc reports to a user without a traceback."""


class InputError(HaflocError):
    """A file the user gave us is unusable; names the file and the cause."""

    def __init__(self, path: str | Path, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{printable(self.path)}: {cause}")


class ModelMismatchError(HaflocError):
    """A model does not fit the index / cache / file it is used with."""

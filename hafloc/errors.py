"""Errors users see as one clear line (the CLI prints ``str(err)`` and exits non-zero)."""

from __future__ import annotations

from pathlib import Path


class HaflocError(Exception):
    """Base class of every error hafloc reports to a user without a traceback."""


class InputError(HaflocError):
    """A file the user gave us is unusable; names the file and the cause."""

    def __init__(self, path: str | Path, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class ModelMismatchError(HaflocError):
    """A model does not fit the index / cache / file it is used with."""

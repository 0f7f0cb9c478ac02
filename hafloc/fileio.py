"""Atomic writes: a crash never leaves a half-written result behind."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success.

    The temp file keeps the target's suffix (``suffix`` overrides) so that libraries which pick
    a format from the extension (numpy, h5py, matplotlib) still do the right thing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_file(path.parent, f".{path.name}.", ".partial" + (suffix if suffix is not None else path.suffix))
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """Create a fresh, uniquely named empty file with the permissions of any new file.

    Mode 0o666 goes through the process umask (and default ACLs) as for ``open()``; unlike
    ``mkstemp`` (0600, then a chmod that needs the umask) it never has to read or set the
    umask, which is process-wide and would race with other threads.
    """
    for _ in range(100):
        tmp = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{folder}: could not create a unique temporary file")


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")

"""File-permission helper shared by the report writers."""

from __future__ import annotations

import os
from pathlib import Path


def make_readable(tmp: Path) -> None:
    """Give a temp file the umask's normal permissions: mkstemp makes it 0600, reports are shared/served."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)

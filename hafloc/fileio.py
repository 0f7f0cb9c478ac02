"""Atomic writes: a crash never leaves a half-written result behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .errors import InputError

if TYPE_CHECKING:
    import filelock


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path; on success its content lands on ``path``.

    A regular file (or a new name) is replaced by rename, so a crash leaves the old file whole. A
    symlink is followed and its target replaced the same way (the link stays a link). A FIFO,
    device or ``/dev/stdout`` cannot be renamed onto: the finished temp file is copied into it
    (``write_through``). The temp file keeps the target's suffix (``suffix`` overrides) so that
    libraries which pick a format from the extension (numpy, h5py, matplotlib) still do the right thing.
    """
    path = Path(path)
    target, replace = write_target(path)
    ext = ".partial" + (suffix if suffix is not None else path.suffix)
    if replace:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _new_file(target.parent, f".{target.name}.", ext)
    else:  # the target's folder (/dev, /proc) may not be writable
        tmp_path = _new_file(Path(tempfile.gettempdir()), f".hafloc-{path.name}.", ext)
    try:
        yield tmp_path
        if replace:
            os.replace(tmp_path, target)
        else:
            write_through(path, tmp_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_target(path: Path) -> tuple[Path, bool]:
    """Where a write to ``path`` lands, and whether it may be replaced by rename.

    Symlinks are followed link by link (a dangling one names the file to create). Links under
    ``/proc`` (``/dev/stdout`` -> ``/proc/self/fd/1``) stand for an open file, not a name: they
    and every target that is not a regular file are written through, never replaced.
    """
    p = path
    for _ in range(40):  # the kernel's own limit on nested links
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return p, True
        except NotADirectoryError:
            return path, True  # let the write report it
        if not stat.S_ISLNK(st.st_mode):
            return p, stat.S_ISREG(st.st_mode)
        if os.path.realpath(p.parent).startswith("/proc/"):
            return path, False
        p = p.parent / os.readlink(p)
    return path, False  # a loop of links: the open() reports it


def write_through(path: Path, src: Path) -> None:
    """Copy ``src`` into the existing non-regular file ``path`` (FIFO, device, open-file link).

    Opened for appending: nothing to truncate on a pipe or device, and a ``/dev/stdout``
    redirected to a file keeps what the process already wrote there.
    """
    with open(src, "rb") as fin, open(path, "ab") as fout:
        shutil.copyfileobj(fin, fout)


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


def write_text_atomic(path: str | Path, text: str, errors: str = "strict") -> None:
    """Write ``text`` as UTF-8; ``errors="surrogateescape"`` writes file names that are not UTF-8
    (surrogate-escaped by ``os.fsdecode``) as their raw bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors=errors)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def exclusive_folder(folder: str | Path, busy: str) -> Iterator[Path]:
    """Create ``folder`` and hold an OS lock on the folder itself while the block runs; a second
    holder fails at once with ``InputError(folder, busy)``.

    Locking the folder, not a file in it, leaves nothing behind in a result folder, and the OS
    drops the lock when its holder dies. Where folders cannot be locked (Windows has no flock,
    NFS emulates it only for files open for writing) the block runs unprotected: each write is
    still atomic on its own.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(folder, "is not a folder") from None
    except OSError as err:
        raise InputError(folder, f"cannot be created ({err.strerror or err})") from None
    try:
        import fcntl
    except ImportError:
        yield folder
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except NotADirectoryError:
        raise InputError(folder, "is not a folder") from None
    except OSError as err:
        raise InputError(folder, f"cannot be opened ({err.strerror or err})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(folder, busy) from None
        except OSError:
            pass  # no flock here (see above)
        yield folder
    finally:
        os.close(fd)  # releases the lock


def os_lock(path: str | Path) -> filelock.BaseFileLock:
    """An OS (flock) lock on ``path``, released by the OS when its holder dies. filelock 4 would
    otherwise fall back to a marker file on file systems without flock, which a killed holder
    leaves behind (and every later writer then waits on)."""
    import filelock

    try:
        return filelock.FileLock(str(path), fallback_to_soft=False)
    except TypeError:  # filelock < 4 has no soft fallback to refuse
        return filelock.FileLock(str(path))


def file_sha1(path: str | Path) -> str:
    """SHA-1 of a file's bytes, read in 1 MiB blocks (image content keys, chunk checksums)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

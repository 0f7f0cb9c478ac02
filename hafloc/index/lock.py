"""The writers' lock of an index folder: an OS file lock on ``.write.lock`` (released by the OS when
its holder dies), re-entrant within a store, with the holder recorded in ``.write.lock.owner``."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import filelock

from hafloc.errors import HaflocError, InputError, printable
from hafloc.fileio import os_lock, write_json_atomic
from hafloc.index.migrate import SchemaMigration
from hafloc.index.storebase import _now, read_index_json

#              and migrated in place by their first writer.
LOCK_NAME = ".write.lock"


def _env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


DEFAULT_LOCK_TIMEOUT = _env_seconds("HAFLOC_LOCK_TIMEOUT", 600.0)  # seconds a writer waits for another


class WriteLock(SchemaMigration):
    """One writer at a time: ``_writing`` waits (up to ``lock_timeout``), ``_try_writing`` never waits."""

    def _init_lock_only(self, folder: Path, lock_timeout: float | None, read_only: bool = False) -> None:
        self.folder = folder
        self.read_only = read_only
        self.lock_timeout = DEFAULT_LOCK_TIMEOUT if lock_timeout is None else float(lock_timeout)
        self._lock = threading.RLock()  # a server's worker threads share this object
        self._flock = os_lock(folder / LOCK_NAME)
        self._write_depth = 0

    def _owner_path(self) -> Path:
        return self.folder / (LOCK_NAME + ".owner")

    def lock_owner(self) -> str:
        """Who holds (or last held) the write lock, in words."""
        try:
            o = json.loads(self._owner_path().read_text())
            return f"pid {o['pid']} on {o['host']} ({o['command']}, since {o['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    @contextmanager
    def _writing(self, refresh: bool = True) -> Iterator[None]:
        """Hold the index's write lock (re-entrant); on first entry re-read index.json and migrate."""
        if self.read_only:
            raise HaflocError(f"{self.folder}: opened read-only (as a server opens it); it cannot be changed here")
        with self._lock:
            if self._write_depth:
                self._write_depth += 1
                try:
                    yield
                finally:
                    self._write_depth -= 1
                return
            self._acquire_flock(self.lock_timeout)
            self._write_depth = 1
            try:
                try:
                    write_json_atomic(
                        self._owner_path(),
                        {
                            "pid": os.getpid(),
                            "host": socket.gethostname(),
                            "since": _now(),
                            "command": " ".join(printable(a) for a in sys.argv)[:300],
                        },
                    )
                except OSError:
                    pass
                if refresh:
                    # another writer may have changed it since we opened (counts, calibration, ...)
                    self.info = read_index_json(self.folder)
                    self._schema = self._read_schema()  # another writer may have migrated it meanwhile
                    if self._schema == 1:
                        self._migrate_v1()
                    if self._schema:
                        self._add_chunk_sums()
                yield
            finally:
                self._write_depth = 0
                self._flock.release()

    def _acquire_flock(self, timeout: float) -> None:
        """Take the OS lock, waiting up to ``timeout`` seconds (saying so on stderr); HaflocError if it stays taken."""
        try:
            self._flock.acquire(timeout=0)
            return
        except filelock.Timeout:
            pass
        except OSError as err:
            raise InputError(
                self.folder / LOCK_NAME, f"cannot take the index's write lock ({err.strerror or err})"
            ) from None
        if timeout > 0:
            print(
                f"hafloc: waiting for the index lock held by {self.lock_owner()} (up to {timeout:g} s)",
                file=sys.stderr,
                flush=True,
            )
            try:
                self._flock.acquire(timeout=timeout)
                return
            except filelock.Timeout:
                pass
        raise HaflocError(
            f"{self.folder}: gave up after {timeout:g} s waiting for the index lock held by {self.lock_owner()}; "
            "try again when it has finished (or raise --lock-timeout)"
        )

    @contextmanager
    def _try_writing(self) -> Iterator[bool]:
        """The write lock if it is free right now (True), else nothing (False); never waits."""
        if self.read_only:
            yield False
            return
        with self._lock:
            if self._write_depth:
                yield True
                return
            try:
                self._acquire_flock(0)
            except HaflocError:
                yield False
                return
            self._write_depth = 1
            try:
                yield True
            finally:
                self._write_depth = 0
                self._flock.release()

    def update_info(self, **fields: Any) -> None:
        """Store ``fields`` in index.json (e.g. the fitted re-ranking rule), under the write lock."""
        with self._writing():
            self.info.update(fields)
            write_json_atomic(self.folder / "index.json", self.info)

"""What every part of ``IndexStore`` shares: an open folder's state, ``index.json`` (read and
checked field by field), SQLite reads, the model's fingerprint and the index's descriptor space."""

from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Sequence

import filelock
import numpy as np

from hafloc.errors import HaflocError, InputError, ModelMismatchError
from hafloc.fileio import write_json_atomic
from hafloc.index.compact import PROJECTION_FILE, Projection, check_compact, mismatch
from hafloc.index.search import SearchConfig, SearchIndex

FORMAT = "hafloc-index"
VERSION = 2  # 2: images unique by (root, path), sha1 column. Version 1 indexes are read as they are
#              and migrated in place by their first writer.


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def db_text(s: str) -> str | bytes:
    """A name as SQLite stores it: text when it is valid UTF-8, else its raw bytes (lossless)."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return os.fsencode(s)


def py_text(v: str | bytes) -> str:
    """The inverse of ``db_text``: bytes come back surrogate-escaped, as ``os.fsdecode`` gives them."""
    return os.fsdecode(v) if isinstance(v, bytes) else v


def read_index_json(folder: Path) -> dict[str, Any]:
    """``index.json`` checked field by field (InputError naming the file and what is wrong)."""
    meta = folder / "index.json"
    if not meta.is_file():
        raise InputError(folder, "not a hafloc index (no index.json)")
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(meta, f"unreadable index description ({err})") from None
    if not isinstance(info, dict):
        raise InputError(meta, f"index description is not a JSON object (found {type(info).__name__})")
    if info.get("format") != FORMAT:
        raise InputError(meta, f'not a hafloc index description ("format" is not {FORMAT!r})')
    version = info.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(meta, f"field 'version' is not a positive integer ({version!r})")
    if version > VERSION:
        raise InputError(meta, f"index version {version} is newer than this hafloc supports ({VERSION})")
    dim = info.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise InputError(meta, f"field 'dim' is missing or not a positive integer ({dim!r})")
    fp = info.get("model_fingerprint")
    if not isinstance(fp, str) or not fp:
        raise InputError(meta, f"field 'model_fingerprint' is missing or not a string ({fp!r})")
    search_conf = info.get("search", {})
    try:
        if not isinstance(search_conf, dict):
            raise TypeError(f"not an object: {search_conf!r}")
        SearchConfig.from_dict(search_conf)
    except (TypeError, ValueError) as err:
        raise InputError(meta, f"field 'search' is invalid ({err})") from None
    check_compact(info, meta)
    return info


class StoreBase:
    """The state of an open index folder (set by ``IndexStore``) and the reads every part uses."""

    folder: Path
    info: dict[str, Any]
    read_only: bool
    lock_timeout: float
    _lock: threading.RLock
    _flock: filelock.BaseFileLock
    _write_depth: int
    _db: sqlite3.Connection
    _schema: int
    _projection: Projection | None
    _search: SearchIndex | None
    _search_ids: np.ndarray | None
    _search_key: tuple[int, int] | None
    _published: tuple[int, int] | None
    _stamp: tuple[int, int, int] | None
    _counted: tuple[int, int]

    @property
    def fingerprint(self) -> str:
        return str(self.info["model_fingerprint"])

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def dtype(self) -> str:
        """How descriptors are stored: "float32" or "float16" (searched as float32 either way)."""
        return str(self.info.get("dtype", "float32"))

    @property
    def input_dim(self) -> int:
        """Size of the model descriptors the index takes (before its projection, if any)."""
        p = self.info.get("projection")
        return int(p["input_dim"]) if p else self.dim

    def projection(self) -> Projection | None:
        """The index's PCA-whitening (None when it stores the model's descriptors as they are)."""
        p = self.info.get("projection")
        if not p:
            return None
        if self._projection is None:
            path = self.folder / PROJECTION_FILE
            if not p.get("fitted_on"):
                raise HaflocError(
                    f"{self.folder}: the index's projection is fitted on its first images; add some first"
                )
            self._projection = Projection.load(path, p)
        return self._projection

    def project(self, desc: np.ndarray) -> np.ndarray:
        """Model descriptors (N, input_dim) -> the index's space (N, dim), as the database was
        projected; descriptors already in the index's space (N, dim) pass through."""
        x = np.atleast_2d(np.asarray(desc, dtype=np.float32))
        if x.shape[1] == self.dim:
            return x
        if x.shape[1] != self.input_dim:
            raise mismatch(self.folder, x.shape[1], self.input_dim, self.dim)
        proj = self.projection()
        assert proj is not None
        return proj(x)

    @property
    def search_config(self) -> SearchConfig:
        return SearchConfig.from_dict(self.info.get("search", {}))

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """A read; damage found only now (a garbled page) becomes a one-line InputError."""
        try:
            with self._lock:
                return self._db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as err:
            raise InputError(
                self.folder / "meta.sqlite",
                f"damaged index database ({err}); 'hafloc index verify' reports what is wrong",
            ) from None

    def __len__(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM images")[0][0])

    def image_count(self) -> int:
        """``len(self)``, counted again only when a writer has committed since (a server's /health)."""
        with self._lock:
            version = int(self._query("PRAGMA data_version")[0][0])
            if self._counted[0] != version:
                self._counted = (version, len(self))
            return self._counted[1]

    def check_model(self, fingerprint: str, model_path: str | Path | None = None) -> None:
        """Refuse a model other than the one the index was built with."""
        if fingerprint != self.fingerprint:
            built = self.info.get("model_path") or "unknown path"
            given = f" ({model_path})" if model_path else ""
            raise ModelMismatchError(
                f"{self.folder}: index was built with model {self.fingerprint[:12]} ({built}), "
                f"you gave model {fingerprint[:12]}{given}; use the same model or build a new index"
            )

    def _write_info(self) -> None:
        n, npos = self._db.execute("SELECT COUNT(*), COUNT(lat) FROM images").fetchone()
        self.info["counts"] = {"images": int(n), "positioned": int(npos)}
        self.info["updated_at"] = _now()
        write_json_atomic(self.folder / "index.json", self.info)

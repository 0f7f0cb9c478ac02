"""The persistent index folder: descriptors + SQLite metadata + model fingerprint + search structure.

Layout of a folder::

    index.json            model fingerprint/path, descriptor dim, search config, counts
    meta.sqlite           table images: one row per indexed image, unique by (root, path)
    chunks/chunk_NNNNNN.npy   descriptors, one file per committed chunk (see CHUNK_KINDS)
    search.faiss (+ .json, search.ids.npy)   the search structure, rebuilt from the chunks
                          (on disk: + search.ivfdata, search.rows.npy, ... see hafloc.index.ondisk)
    projection.npz        the index's PCA-whitening, when it stores projected descriptors (compact.py)
    .write.lock (+ .owner)    the writers' lock and who holds it

One writer at a time: every write (add, remove, set-position, compact, saving the search files)
holds an OS file lock on ``.write.lock`` (released by the OS when its process dies, so a kill
never blocks the next writer); a second writer waits up to ``lock_timeout`` seconds, then fails
with a one-line error. Readers never take it: they only read committed rows. A store opened
``read_only`` (what a server opens) never takes it either, not even briefly to save a rebuilt search
structure; it memory-maps the saved one (shared by every process serving the index) and keeps
using it until a writer saves the next (see ``_load_published_search``).

The chunk commit protocol (``_commit_chunk``, the one place that writes chunk data): under the
lock a chunk id is allocated, each per-chunk file is written (temp + rename) *before* the
transaction inserting its rows commits, and rows point at their chunk. A kill before the commit
leaves only orphan chunk files (deleted by the next writer); a kill after it leaves a complete
chunk. Rerunning ``add`` skips what is committed, so the result equals an uninterrupted build.
``remove`` only drops rows (their chunk rows go stale until ``compact`` rewrites those chunks).
The search structure is derived data: rebuilt at the end of every write and lazily whenever it
does not match the rows (e.g. after a kill).

Images are keyed by their absolute root + path relative to it. Names that are not valid UTF-8
are kept losslessly as Python's surrogate-escaped str (``os.fsdecode``) and stored as their raw
bytes (a BLOB in the same column); ``hafloc.errors.printable`` shows them escaped.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hafloc.descriptors.modelfile import DEFAULT
from hafloc.errors import HaflocError, InputError, ModelMismatchError
from hafloc.fileio import file_sha1, write_json_atomic
from hafloc.index.adding import Adding, AddReport, Extracted, ExtractFn, extractor_fn, local_of
from hafloc.index.chunks import CHUNK_KINDS, ROWS_ATTR, ChunkKind, chunk_files, chunk_path
from hafloc.index.compact import DTYPES, Projection
from hafloc.index.lock import DEFAULT_LOCK_TIMEOUT, LOCK_NAME
from hafloc.index.migrate import _SCHEMA
from hafloc.index.published import IN_MEMORY_FALLBACK_BYTES, Match
from hafloc.index.search import SearchConfig, SearchIndex
from hafloc.index.storebase import FORMAT, VERSION, _now, db_text, py_text, read_index_json

# what ``from hafloc.index.store import ...`` has always offered (each defined in the part doing that job)
__all__ = [
    "FORMAT",
    "VERSION",
    "LOCK_NAME",
    "DEFAULT_LOCK_TIMEOUT",
    "IN_MEMORY_FALLBACK_BYTES",
    "ChunkKind",
    "ROWS_ATTR",
    "CHUNK_KINDS",
    "chunk_path",
    "chunk_files",
    "db_text",
    "py_text",
    "file_sha1",
    "local_of",
    "ExtractFn",
    "Extracted",
    "extractor_fn",
    "AddReport",
    "Match",
    "read_index_json",
    "IndexStore",
]


class IndexStore(Adding):
    """A persistent, resumable image index. Use ``create``/``open``/``open_or_create``."""

    def __init__(self, folder: Path, info: dict[str, Any], lock_timeout: float | None = None, read_only: bool = False):
        if not hasattr(self, "_flock"):  # ``create`` sets the lock up first, and holds it while we run
            self._init_lock_only(folder, lock_timeout, read_only)
        self._published: tuple[int, int] | None = None  # (n, max_id) of the saved search we mapped
        self._stamp: tuple[int, int, int] | None = None  # read-only: ``_change_stamp`` at the last check
        self._counted: tuple[int, int] = (-1, 0)  # (data_version, images) for ``image_count``
        self.info = info
        self._projection: Projection | None = None
        self._search: SearchIndex | None = None
        self._search_ids: np.ndarray | None = None
        self._search_key: tuple[int, int] | None = None
        db_path = folder / "meta.sqlite"
        try:
            # one connection shared by a server's worker threads, serialised by self._lock
            self._db = sqlite3.connect(str(db_path), timeout=60.0, check_same_thread=False)
            self._schema = self._read_schema()
            if self._schema == 0 and not self.read_only:
                self._db.executescript(_SCHEMA)
                self._schema = 2
        except sqlite3.DatabaseError as err:
            raise InputError(
                db_path, f"damaged index database ({err}); 'hafloc index verify' reports what is wrong"
            ) from None

    @classmethod
    def create(
        cls,
        folder: str | Path,
        fingerprint: str,
        dim: int,
        search_config: SearchConfig | None = None,
        model_path: str | Path | None = None,
        lock_timeout: float | None = None,
        local: dict[str, Any] | None = None,
        compact: dict[str, Any] | None = None,
    ) -> "IndexStore":
        """Start an empty index in ``folder`` (which must not already hold one).

        ``local``: {"extractor": name, "conf": {...}} when the index stores local features.
        ``compact``: {"dim": D' or None, "dtype": "float16"|"float32"}: store ``dim``-D model
        descriptors PCA-whitened to D' < dim (fitted on the first images added) and/or as float16.
        """
        compact = compact or {}
        dtype = compact.get("dtype") or "float32"
        out_dim = compact.get("dim")
        if dtype not in DTYPES:
            raise HaflocError(f"descriptor storage must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if out_dim is not None and not 0 < int(out_dim) < int(dim):
            raise HaflocError(f"--dim {out_dim}: choose a size below the model's {dim}-D descriptor (or 'full')")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        info = {
            "format": FORMAT,
            "version": VERSION,
            "model_fingerprint": fingerprint,
            # the shipped default model is recorded by name: the installed package may move
            "model_path": (model_path if model_path == DEFAULT else str(Path(model_path).resolve()))
            if model_path
            else None,
            "dim": int(out_dim or dim),
            "dtype": dtype,
            "search": (search_config or SearchConfig()).to_dict(),
            "counts": {"images": 0, "positioned": 0},
            "created_at": _now(),
        }
        if local:
            info["local"] = dict(local)
        if out_dim:
            info["projection"] = {"input_dim": int(dim), "dim": int(out_dim), "fitted_on": 0}
        store = cls.__new__(cls)
        store._init_lock_only(folder, lock_timeout)
        with store._writing(refresh=False):
            if (folder / "index.json").exists():  # checked under the lock: two builds may start at once
                raise HaflocError(f"{folder}: already holds an index (open it, or choose another folder)")
            cls.__init__(store, folder, info, lock_timeout)
            # index.json last: its presence is what makes the folder "an index".
            write_json_atomic(folder / "index.json", info)
        return store

    @classmethod
    def open(cls, folder: str | Path, lock_timeout: float | None = None, read_only: bool = False) -> "IndexStore":
        """An existing index; ``read_only``: for servers, never takes the write lock (writes raise)."""
        folder = Path(folder)
        info = read_index_json(folder)
        if not (folder / "meta.sqlite").is_file():
            raise InputError(folder, "index is missing meta.sqlite")
        return cls(folder, info, lock_timeout, read_only)

    @classmethod
    def open_or_create(
        cls,
        folder: str | Path,
        fingerprint: str,
        dim: int,
        search_config: SearchConfig | None = None,
        model_path: str | Path | None = None,
        lock_timeout: float | None = None,
        local: dict[str, Any] | None = None,
        compact: dict[str, Any] | None = None,
    ) -> "IndexStore":
        """Resume an existing index built with the same model (and local features, and compact
        representation when one is given), or start a new one."""
        folder = Path(folder)
        try:
            return cls.create(folder, fingerprint, dim, search_config, model_path, lock_timeout, local, compact)
        except HaflocError:
            if not (folder / "index.json").exists():
                raise
        store = cls.open(folder, lock_timeout)
        try:
            store.check_model(fingerprint)
            have = store.local_config
            if local and have is None:
                raise HaflocError(
                    f"{folder}: index was built without local features; build a new index with "
                    f"--local {local.get('extractor')}"
                )
            if local and have is not None and local != have:
                raise ModelMismatchError(
                    f"{folder}: index holds local features {have}, you asked for {local}; "
                    "use the same --local options or build a new index"
                )
            if compact:  # the fields asked for (a missing one: whatever the index has)
                stored = (store.dim, store.dtype)
                want = (compact["dim"] or dim if "dim" in compact else stored[0], compact.get("dtype") or stored[1])
                if want != stored:
                    raise HaflocError(
                        f"{folder}: index stores {stored[0]}-D {stored[1]} descriptors, you asked for "
                        f"{want[0]}-D {want[1]}; use the same --dim/--dtype or build a new index"
                    )
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def find(self, targets: Sequence[str | Path]) -> tuple[list[int], list[str]]:
        """Ids of the indexed images that are, or lie under, the given files/folders; and the
        targets that matched nothing."""
        by_path = self._abs_paths()
        ids: set[int] = set()
        unmatched: list[str] = []
        for t in targets:
            forms = {os.path.abspath(t), str(Path(t).resolve())}
            hit = {
                i
                for p, i in by_path.items()
                if p in forms or any(p.startswith(f.rstrip(os.sep) + os.sep) for f in forms)
            }
            if hit:
                ids |= hit
            else:
                unmatched.append(str(t))
        return sorted(ids), unmatched

    def missing(self) -> list[int]:
        """Ids of the indexed images whose file no longer exists."""
        return sorted(i for p, i in self._abs_paths().items() if not os.path.exists(p))

    def remove(self, ids: Sequence[int]) -> int:
        """Drop the rows of ``ids`` (their chunk rows stay until ``compact``); rebuilds the search."""
        ids = sorted({int(i) for i in ids})
        with self._writing():
            removed = 0
            with self._db:
                for start in range(0, len(ids), 500):
                    part = ids[start : start + 500]
                    removed += self._db.execute(
                        f"DELETE FROM images WHERE id IN ({','.join('?' * len(part))})", part
                    ).rowcount
            self._write_info()
            self.rebuild_search()
        return removed

    def compact(self) -> dict[str, int]:
        """Rewrite every chunk holding removed rows with only its live rows (new chunk ids, one
        transaction re-pointing the rows, then the old files go); delete orphan files."""
        with self._writing():
            (self.folder / "chunks").mkdir(exist_ok=True)
            used = {r[0] for r in self._db.execute("SELECT DISTINCT chunk FROM images")}
            orphans = len(set(self.chunk_files()) - used)
            self._remove_orphan_chunks()
            rows_by_chunk: dict[int, list[tuple[int, int]]] = {}
            for i, chunk, row in self._db.execute("SELECT id, chunk, row FROM images ORDER BY chunk, row"):
                rows_by_chunk.setdefault(int(chunk), []).append((int(i), int(row)))
            updates: list[tuple[int, int, int]] = []
            sums: dict[int, dict[str, str]] = {}
            rewritten = dropped = 0
            for chunk, live in rows_by_chunk.items():
                files = self.chunk_files().get(chunk, {})
                data = {kind: k.read(files[kind]) for kind, k in CHUNK_KINDS.items() if kind in files or not k.optional}
                n_rows = CHUNK_KINDS["descriptors"].rows(data["descriptors"])
                if [r for _, r in live] == list(range(n_rows)):
                    continue  # nothing stale in this chunk
                keep = np.array([r for _, r in live], np.int64)
                new = self._next_chunk()
                sums[new] = self._write_chunk(new, {kind: CHUNK_KINDS[kind].take(v, keep) for kind, v in data.items()})
                updates.extend((new, j, i) for j, (i, _) in enumerate(live))
                rewritten += 1
                dropped += n_rows - len(live)
            with self._db:
                for new, chunk_sums in sums.items():
                    self._record_sums(new, chunk_sums)
                self._db.executemany("UPDATE images SET chunk = ?, row = ? WHERE id = ?", updates)
            self._remove_orphan_chunks()
            self._write_info()
            # the rows keep their ids, but an on-disk search reads their vectors by chunk and row
            self.rebuild_search(force=bool(rewritten))
        return {
            "chunks_rewritten": rewritten,
            "stale_rows_dropped": dropped,
            "orphan_chunks_deleted": orphans,
            "images": len(self),
        }

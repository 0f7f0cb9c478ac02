"""Chunk files and their commit protocol: every per-chunk file (``CHUNK_KINDS``) is written, temp +
rename, *before* the transaction inserting its rows (and the files' SHA-1, table ``chunk_sums``)
commits; files no row points at are orphans (a kill between the two), deleted by the next writer.
The checksums let ``verify`` notice content changed after the write (a row overwritten with other,
perfectly valid floats passes every shape and finiteness check)."""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from hafloc.errors import InputError
from hafloc.fileio import atomic_path, file_sha1
from hafloc.index.lock import WriteLock
from hafloc.index.storebase import py_text

if TYPE_CHECKING:
    from hafloc.local import LocalFeatures


@dataclass(frozen=True)
class ChunkKind:
    """One kind of per-chunk file: how it is named, written, read and cut down to some of its rows."""

    pattern: str  # file name inside chunks/, formatted with the chunk id
    write: Callable[[Path, Any], None]
    read: Callable[[Path], Any]
    take: Callable[[Any, np.ndarray], Any]  # data of the given rows (in that order), for compact
    rows: Callable[[Any], int]  # how many rows a chunk's data holds, for verify
    optional: bool = False  # only some indexes have it (local features: built with --local)


def _save_npy(path: Path, a: Any) -> None:
    # float16 when the index stores float16 (index.json "dtype"), else float32
    np.save(path, np.ascontiguousarray(a, dtype=np.float16 if np.asarray(a).dtype == np.float16 else np.float32))


ROWS_ATTR = "hafloc_rows"  # root attribute of a local-feature chunk: its image names in row order (JSON)


def _save_local(path: Path, items: "Sequence[tuple[str, LocalFeatures]]") -> None:
    """hloc's features.h5 layout (one group per image name), plus the row order as a root attribute
    (attributes are invisible to hloc's readers)."""
    import h5py

    from hafloc.local import write_local_features

    write_local_features(path, dict(items), append=False)
    with h5py.File(path, "a") as f:
        f.attrs[ROWS_ATTR] = json.dumps([n for n, _ in items])


def _read_local(path: Path) -> "list[tuple[str, LocalFeatures]]":
    import h5py

    from hafloc.local import read_local_features

    with h5py.File(path, "r") as f:
        names = json.loads(f.attrs[ROWS_ATTR])
    return [(n, read_local_features(path, n)) for n in names]


# Every per-chunk file the commit protocol writes; a new kind only adds an entry.
CHUNK_KINDS: dict[str, ChunkKind] = {
    "descriptors": ChunkKind(
        "chunk_{:06d}.npy",
        _save_npy,
        lambda p: np.load(p, allow_pickle=False),
        lambda a, rows: a[rows],
        lambda a: int(a.shape[0]),
    ),
    "local": ChunkKind(
        "local_{:06d}.h5", _save_local, _read_local, lambda a, rows: [a[i] for i in rows], len, optional=True
    ),
}


def _kind_regex(kind: ChunkKind) -> re.Pattern[str]:
    head, tail = kind.pattern.split("{:06d}")
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + "$")


def chunk_path(folder: Path, chunk: int, kind: str = "descriptors") -> Path:
    return folder / "chunks" / CHUNK_KINDS[kind].pattern.format(chunk)


def chunk_files(folder: Path) -> dict[int, dict[str, Path]]:
    """Chunk files on disk: {chunk id: {kind: path}}."""
    out: dict[int, dict[str, Path]] = {}
    regexes = {kind: _kind_regex(k) for kind, k in CHUNK_KINDS.items()}
    if not (folder / "chunks").is_dir():
        return out
    for p in (folder / "chunks").iterdir():
        for kind, rx in regexes.items():
            m = rx.match(p.name)
            if m:
                out.setdefault(int(m.group(1)), {})[kind] = p
    return out


def read_chunk_sums(db: sqlite3.Connection) -> dict[tuple[int, str], str] | None:
    """{(chunk, kind): sha1} recorded at write time; None for an index written before checksums."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'chunk_sums'").fetchone():
        return None
    return {(int(c), str(k)): str(h) for c, k, h in db.execute("SELECT chunk, kind, sha1 FROM chunk_sums")}


class ChunkFiles(WriteLock):
    """The chunk files of an index: allocate, write and commit them; read the descriptors back."""

    def _chunk_path(self, chunk: int, kind: str = "descriptors") -> Path:
        return chunk_path(self.folder, chunk, kind)

    def chunk_files(self) -> dict[int, dict[str, Path]]:
        return chunk_files(self.folder)

    def _remove_orphan_chunks(self) -> None:
        """Delete chunk files no row points at (a kill between file and transaction, or compact's
        old chunks) and temp files of killed writes. Only under the write lock."""
        assert self._write_depth
        used = {r[0] for r in self._db.execute("SELECT DISTINCT chunk FROM images")}
        for chunk, files in self.chunk_files().items():
            if chunk not in used:
                for p in files.values():
                    p.unlink(missing_ok=True)
        with self._db:  # their checksums go with them
            self._db.execute("DELETE FROM chunk_sums WHERE chunk NOT IN (SELECT DISTINCT chunk FROM images)")
        for p in (self.folder / "chunks").glob(".*.partial*"):
            p.unlink(missing_ok=True)

    def _next_chunk(self) -> int:
        """A chunk id no row and no file uses (allocated under the write lock)."""
        assert self._write_depth, "chunk ids are allocated under the write lock"
        in_rows = int(self._db.execute("SELECT COALESCE(MAX(chunk), 0) FROM images").fetchone()[0])
        return max([in_rows, *self.chunk_files()]) + 1

    def _write_chunk(self, chunk: int, data: dict[str, Any]) -> dict[str, str]:
        """Step 1 of the protocol: every per-chunk file of ``chunk``, each atomically (temp + rename).
        Returns {kind: SHA-1 of the file written}, for ``_record_sums`` in the rows' transaction."""
        required = {k for k, v in CHUNK_KINDS.items() if not v.optional}
        assert required <= set(data) <= set(CHUNK_KINDS), (
            f"a chunk needs data for {sorted(required)}, got {sorted(data)}"
        )
        sums = {}
        for kind, value in data.items():
            with atomic_path(self._chunk_path(chunk, kind)) as tmp:
                CHUNK_KINDS[kind].write(tmp, value)
                sums[kind] = file_sha1(tmp)  # just written: read back from the page cache
        return sums

    def _record_sums(self, chunk: int, sums: dict[str, str]) -> None:
        """Inside the transaction committing ``chunk``'s rows (an id may be reused after its rows went)."""
        self._db.executemany(
            "INSERT OR REPLACE INTO chunk_sums (chunk, kind, sha1) VALUES (?, ?, ?)",
            [(chunk, kind, h) for kind, h in sums.items()],
        )

    def _commit_chunk(self, data: dict[str, Any], rows: Sequence[dict[str, Any]]) -> int:
        """The commit protocol: allocate a chunk id, write its files, then insert its rows (row i of
        the chunk = ``rows[i]``) in one transaction. Returns the chunk id."""
        chunk = self._next_chunk()
        sums = self._write_chunk(chunk, data)
        cols = (
            "path",
            "root",
            "lat",
            "lon",
            "easting",
            "northing",
            "zone",
            "zone_letter",
            "position_source",
            "added_at",
            "sha1",
        )
        with self._db:  # one transaction: all rows of the chunk (and its checksums) or none
            self._record_sums(chunk, sums)
            self._db.executemany(
                f"INSERT INTO images ({', '.join(cols)}, chunk, row) VALUES ({','.join('?' * (len(cols) + 2))})",
                [tuple(r.get(c) for c in cols) + (chunk, i) for i, r in enumerate(rows)],
            )
        return chunk

    def descriptors(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """All (ids, relative paths, descriptors (N, D)) in id order."""
        for attempt in range(2):
            try:
                return self._descriptors()
            except FileNotFoundError:
                if attempt:  # a compact moved the rows to new chunks meanwhile: read them again
                    raise
        raise AssertionError("unreachable")

    def _descriptors(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        rows = self._query("SELECT id, path, chunk, row FROM images ORDER BY id")
        out = np.empty((len(rows), self.dim), np.float32)
        loaded: dict[int, np.ndarray] = {}
        for i, (_, _, chunk, row) in enumerate(rows):
            if chunk not in loaded:
                p = self._chunk_path(chunk)
                if not p.exists() and self._chunk_moved(chunk):
                    raise FileNotFoundError(p)
                try:
                    loaded = {
                        chunk: np.load(p, allow_pickle=False)
                    }  # rows are grouped by chunk: keep one file in memory
                except (OSError, ValueError) as err:
                    raise InputError(p, f"descriptor chunk unreadable ({err}); the index is damaged") from None
                a = loaded[chunk]
                if a.ndim != 2 or a.shape[1] != self.dim:
                    raise InputError(
                        p, f"descriptor chunk has shape {a.shape}, expected (N, {self.dim}); the index is damaged"
                    )
            if not 0 <= row < len(loaded[chunk]):
                raise InputError(
                    self._chunk_path(chunk),
                    f"holds {len(loaded[chunk])} rows, an image points at row {row}; the index is damaged",
                )
            out[i] = loaded[chunk][row]
        return (np.array([r[0] for r in rows], np.int64), [py_text(r[1]) for r in rows], out)

    def _chunk_moved(self, chunk: int) -> bool:
        return not self._query("SELECT 1 FROM images WHERE chunk = ? LIMIT 1", (chunk,))

"""The persistent index folder: descriptors + SQLite metadata + model fingerprint + search structure.

Layout of a folder::

    index.json            model fingerprint/path, descriptor dim, search config, counts
    meta.sqlite           table images (one row per indexed image, path unique)
    chunks/chunk_NNNNNN.npy   descriptors, one file per committed chunk
    search.faiss (+ .json, search.ids.npy)   the search structure, rebuilt from the chunks

Building is atomic and resumable: a chunk's descriptor file is written (temp + rename) *before*
the transaction inserting its rows commits, and rows point at their chunk file. A kill before the
commit leaves only an orphan chunk file (ignored, then deleted); a kill after it leaves a complete
chunk. Rerunning ``add`` skips what is committed, so the result equals an uninterrupted build.
The search structure is derived data: rebuilt at the end of ``add`` and lazily whenever it does not
match the rows (e.g. after a kill).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from hafloc.errors import HaflocError, InputError, ModelMismatchError
from hafloc.fileio import atomic_path, write_json_atomic
from hafloc.index.positions import Position, resolve_position
from hafloc.index.search import (SearchConfig, SearchIndex, build_search_index, load_search_index,
                                 params_path, save_search_index, search)

FORMAT = "hafloc-index"
VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    root TEXT NOT NULL,
    lat REAL, lon REAL, easting REAL, northing REAL, zone INTEGER, zone_letter TEXT,
    position_source TEXT,
    added_at TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    row INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS images_chunk ON images(chunk);
"""


class ExtractResultLike(Protocol):
    names: list[str]
    descriptors: np.ndarray
    failures: list[tuple[str, str]]


# extract_fn(paths, names) -> result with .names / .descriptors (N, D) / .failures [(name, reason)]
ExtractFn = Callable[[list[Path], list[str]], ExtractResultLike]


@dataclass
class Extracted:
    """A plain ExtractResult for extraction callbacks that are not the model Extractor."""

    names: list[str]
    descriptors: np.ndarray
    failures: list[tuple[str, str]] = field(default_factory=list)


def extractor_fn(extractor: Any) -> ExtractFn:
    """Adapt ``hafloc.descriptors.extract.Extractor`` to the store's callback (the store shows progress)."""
    return lambda paths, names: extractor.extract_paths(paths, names=names, progress=False)


@dataclass
class AddReport:
    added: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unpositioned: list[str] = field(default_factory=list)  # relative paths indexed without position


@dataclass
class Match:
    """One retrieved database image. ``image`` is its path relative to ``root``."""

    id: int
    image: str
    root: str
    similarity: float
    lat: float | None = None
    lon: float | None = None
    easting: float | None = None
    northing: float | None = None
    zone: int | None = None
    zone_letter: str | None = None
    position_source: str | None = None
    distance_m: float | None = None
    inliers: int | None = None  # verified local-feature inliers when re-ranked, else None

    @property
    def path(self) -> Path:
        return Path(self.root) / self.image

    @property
    def positioned(self) -> bool:
        return self.lat is not None and self.lon is not None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class IndexStore:
    """A persistent, resumable image index. Use ``create``/``open``/``open_or_create``."""

    def __init__(self, folder: Path, info: dict[str, Any]):
        self.folder = folder
        self.info = info
        # one connection shared by a server's worker threads, serialised by our lock
        self._db = sqlite3.connect(str(folder / "meta.sqlite"), timeout=60.0, check_same_thread=False)
        self._lock = threading.RLock()
        self._db.executescript(_SCHEMA)
        self._search: SearchIndex | None = None
        self._search_ids: np.ndarray | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def create(cls, folder: str | Path, fingerprint: str, dim: int, search_config: SearchConfig | None = None,
               model_path: str | Path | None = None) -> "IndexStore":
        """Start an empty index in ``folder`` (which must not already hold one)."""
        folder = Path(folder)
        if (folder / "index.json").exists():
            raise HaflocError(f"{folder}: already holds an index (open it, or choose another folder)")
        folder.mkdir(parents=True, exist_ok=True)
        info = {
            "format": FORMAT, "version": VERSION,
            "model_fingerprint": fingerprint,
            "model_path": str(Path(model_path).resolve()) if model_path else None,
            "dim": int(dim),
            "search": (search_config or SearchConfig()).to_dict(),
            "counts": {"images": 0, "positioned": 0},
            "created_at": _now(),
        }
        store = cls(folder, info)
        # index.json last: its presence is what makes the folder "an index".
        write_json_atomic(folder / "index.json", info)
        return store

    @classmethod
    def open(cls, folder: str | Path) -> "IndexStore":
        folder = Path(folder)
        meta = folder / "index.json"
        if not meta.is_file():
            raise InputError(folder, "not a hafloc index (no index.json)")
        try:
            info = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(meta, f"unreadable index description ({err})") from None
        if info.get("format") != FORMAT:
            raise InputError(meta, "not a hafloc index description")
        if not (folder / "meta.sqlite").is_file():
            raise InputError(folder, "index is missing meta.sqlite")
        return cls(folder, info)

    @classmethod
    def open_or_create(cls, folder: str | Path, fingerprint: str, dim: int,
                       search_config: SearchConfig | None = None, model_path: str | Path | None = None) -> "IndexStore":
        """Resume an existing index built with the same model, or start a new one."""
        if (Path(folder) / "index.json").exists():
            store = cls.open(folder)
            store.check_model(fingerprint)
            return store
        return cls.create(folder, fingerprint, dim, search_config, model_path)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- properties ----------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return str(self.info["model_fingerprint"])

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def search_config(self) -> SearchConfig:
        return SearchConfig.from_dict(self.info.get("search", {}))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def check_model(self, fingerprint: str, model_path: str | Path | None = None) -> None:
        """Refuse a model other than the one the index was built with."""
        if fingerprint != self.fingerprint:
            built = self.info.get("model_path") or "unknown path"
            given = f" ({model_path})" if model_path else ""
            raise ModelMismatchError(
                f"{self.folder}: index was built with model {self.fingerprint[:12]} ({built}), "
                f"you gave model {fingerprint[:12]}{given}; use the same model or build a new index")

    # -- building ------------------------------------------------------------------------------

    def _chunk_path(self, chunk: int) -> Path:
        return self.folder / "chunks" / f"chunk_{chunk:06d}.npy"

    def _remove_orphan_chunks(self) -> None:
        """Delete chunk files whose rows never committed (a kill between file and transaction)."""
        used = {r[0] for r in self._db.execute("SELECT DISTINCT chunk FROM images")}
        for p in (self.folder / "chunks").glob("chunk_*.npy"):
            try:
                if int(p.stem.split("_")[1]) not in used:
                    p.unlink()
            except (ValueError, IndexError, FileNotFoundError):
                continue

    def add(self, paths: Iterable[str | Path], root: str | Path, extract_fn: ExtractFn,
            positions: dict[str, tuple[float, float]] | None = None, chunk_size: int = 64,
            progress: bool = True, rebuild: bool = True) -> AddReport:
        """Index ``paths`` (absolute, or relative to ``root``), skipping those already indexed.

        ``positions`` ({image: (lat, lon)}, e.g. from ``read_positions_csv``) take priority over
        '@' names and EXIF GPS. Images that fail extraction are reported, not indexed, and retried
        by the next ``add``.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        with self._lock:
            return self._add(paths, Path(root).resolve(), extract_fn, positions, chunk_size, progress, rebuild)

    def _add(self, paths: Iterable[str | Path], root: Path, extract_fn: ExtractFn,
             positions: dict[str, tuple[float, float]] | None, chunk_size: int, progress: bool,
             rebuild: bool) -> AddReport:
        report = AddReport()
        todo: list[tuple[Path, str]] = []
        seen: set[str] = set()
        existing = {r[0] for r in self._db.execute("SELECT path FROM images")}
        for p in paths:
            abs_p = Path(p) if Path(p).is_absolute() else root / p
            try:
                rel = Path(os.path.abspath(abs_p)).relative_to(root).as_posix()
            except ValueError:
                report.failed.append((str(p), f"not inside the indexed root {root}"))
                continue
            if rel in seen:
                continue
            seen.add(rel)
            if rel in existing:
                report.skipped_existing += 1
            else:
                todo.append((Path(os.path.abspath(abs_p)), rel))
        (self.folder / "chunks").mkdir(exist_ok=True)
        self._remove_orphan_chunks()

        bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress or not todo)
        for start in range(0, len(todo), chunk_size):
            batch = todo[start:start + chunk_size]
            self._add_chunk(batch, str(root), extract_fn, positions, report)
            bar.update(len(batch))
        bar.close()
        self._write_info()
        if rebuild:
            self.rebuild_search()
        return report

    def _add_chunk(self, batch: Sequence[tuple[Path, str]], root: str, extract_fn: ExtractFn,
                   positions: dict[str, tuple[float, float]] | None, report: AddReport) -> None:
        by_name = {rel: abs_p for abs_p, rel in batch}
        result = extract_fn([abs_p for abs_p, _ in batch], [rel for _, rel in batch])
        report.failed.extend((str(by_name.get(n, n)), reason) for n, reason in result.failures)
        names = list(result.names)
        if not names:
            return
        desc = np.ascontiguousarray(result.descriptors, dtype=np.float32)
        if desc.ndim != 2 or desc.shape != (len(names), self.dim):
            raise ModelMismatchError(
                f"{self.folder}: extraction gave descriptors of shape {desc.shape} for {len(names)} images, "
                f"the index holds {self.dim}-D descriptors")
        rows = []
        for i, name in enumerate(names):
            if name not in by_name:
                raise ValueError(f"extraction returned {name!r}, which was not asked for")
            pos: Position | None = resolve_position(by_name[name], name, positions)
            if pos is None:
                report.unpositioned.append(name)
            rows.append((name, root, pos, i))
        chunk = int(self._db.execute("SELECT COALESCE(MAX(chunk), 0) FROM images").fetchone()[0]) + 1
        with atomic_path(self._chunk_path(chunk)) as tmp:
            np.save(tmp, desc)
        added_at = _now()
        with self._db:  # one transaction: all rows of the chunk or none
            self._db.executemany(
                "INSERT INTO images (path, root, lat, lon, easting, northing, zone, zone_letter, position_source,"
                " added_at, chunk, row) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [(name, root_s,
                  pos.lat if pos else None, pos.lon if pos else None,
                  pos.easting if pos else None, pos.northing if pos else None,
                  pos.zone if pos else None, pos.letter if pos else None,
                  pos.source if pos else None, added_at, chunk, i)
                 for name, root_s, pos, i in rows])
        report.added += len(rows)

    def _write_info(self) -> None:
        n, npos = self._db.execute("SELECT COUNT(*), COUNT(lat) FROM images").fetchone()
        self.info["counts"] = {"images": int(n), "positioned": int(npos)}
        self.info["updated_at"] = _now()
        write_json_atomic(self.folder / "index.json", self.info)

    # -- reading -------------------------------------------------------------------------------

    def descriptors(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """All (ids, relative paths, descriptors (N, D)) in id order."""
        rows = self._db.execute("SELECT id, path, chunk, row FROM images ORDER BY id").fetchall()
        out = np.empty((len(rows), self.dim), np.float32)
        loaded: dict[int, np.ndarray] = {}
        for i, (_, _, chunk, row) in enumerate(rows):
            if chunk not in loaded:
                p = self._chunk_path(chunk)
                try:
                    loaded = {chunk: np.load(p)}  # rows are grouped by chunk: keep one file in memory
                except (OSError, ValueError) as err:
                    raise InputError(p, f"descriptor chunk unreadable ({err}); the index is damaged") from None
            out[i] = loaded[chunk][row]
        return (np.array([r[0] for r in rows], np.int64), [r[1] for r in rows], out)

    def images(self) -> list[dict[str, Any]]:
        """Metadata rows of all indexed images, in id order."""
        cur = self._db.execute(
            "SELECT id, path, root, lat, lon, easting, northing, zone, zone_letter, position_source, added_at"
            " FROM images ORDER BY id")
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    # -- search --------------------------------------------------------------------------------

    def _search_paths(self) -> tuple[Path, Path]:
        return self.folder / "search.faiss", self.folder / "search.ids.npy"

    def _search_is_fresh(self) -> bool:
        index_p, ids_p = self._search_paths()
        if not (index_p.is_file() and ids_p.is_file() and params_path(index_p).is_file()):
            return False
        try:
            params = json.loads(params_path(index_p).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        n, max_id = self._db.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM images").fetchone()
        # ids only ever grow, so (count, max id) identifies the set of rows
        return params.get("n") == n and params.get("max_id") == max_id and params.get("config") == self.info.get("search")

    def rebuild_search(self, force: bool = False) -> None:
        """(Re)build the search structure from the committed descriptors, unless it is current."""
        if not force and self._search_is_fresh():
            return
        ids, _, desc = self.descriptors()
        self._search = None
        if len(ids) == 0:
            return
        index = build_search_index(desc, self.search_config)
        index.params.update(max_id=int(ids.max()), config=self.info.get("search"))
        index_p, ids_p = self._search_paths()
        try:
            with atomic_path(ids_p) as tmp:
                np.save(tmp, ids)
            save_search_index(index, index_p)  # its JSON goes last and marks the pair complete
        except OSError:
            pass  # a read-only index still searches, from memory
        self._search, self._search_ids = index, ids

    def _ensure_search(self) -> SearchIndex | None:
        if self._search is not None and self._search_is_fresh():
            return self._search
        if self._search_is_fresh():
            index_p, ids_p = self._search_paths()
            try:
                self._search, self._search_ids = load_search_index(index_p), np.load(ids_p)
                if len(self._search_ids) == self._search.ntotal:
                    return self._search
            except (OSError, ValueError, RuntimeError):
                pass
        self.rebuild_search(force=True)
        return self._search

    def search(self, query_desc: np.ndarray, k: int = 10) -> list[Match] | list[list[Match]]:
        """Top-k matches with metadata: a list for one (D,) query, a list of lists for (Nq, D)."""
        q = np.asarray(query_desc, dtype=np.float32)
        single = q.ndim == 1
        q2 = np.atleast_2d(q)
        if q2.shape[1] != self.dim:
            raise ModelMismatchError(f"{self.folder}: query descriptors are {q2.shape[1]}-D, the index holds {self.dim}-D")
        with self._lock:
            index = self._ensure_search()
            if index is None:
                results: list[list[Match]] = [[] for _ in q2]
            else:
                assert self._search_ids is not None
                ids_map = self._search_ids
                sims, rows = search(index, q2, k)
                meta = self._rows_by_id(sorted({int(ids_map[r]) for r in rows.ravel() if r >= 0}))
                results = [[Match(similarity=float(s), **meta[int(ids_map[r])])
                            for s, r in zip(srow, rrow) if r >= 0] for srow, rrow in zip(sims, rows)]
        return results[0] if single else results

    def image(self, image_id: int) -> dict[str, Any] | None:
        """Metadata row of one database image by id (None if there is no such id)."""
        return self._rows_by_id([int(image_id)]).get(int(image_id))

    def _rows_by_id(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for start in range(0, len(ids), 500):  # sqlite's host-parameter limit
            part = ids[start:start + 500]
            cur = self._db.execute(
                "SELECT id, path AS image, root, lat, lon, easting, northing, zone, zone_letter, position_source"
                f" FROM images WHERE id IN ({','.join('?' * len(part))})", part)
            cols = [c[0] for c in cur.description]
            for r in cur.fetchall():
                out[int(r[0])] = dict(zip(cols, r))
        return out

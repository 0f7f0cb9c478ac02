"""The index's search structure: built from the chunks, saved (published) by the holder of the
write lock, loaded or memory-mapped by readers; ``search`` (with the position prior ``near``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hafloc.errors import HaflocError
from hafloc.fileio import atomic_path, write_json_atomic
from hafloc.index.positions import PositionRows
from hafloc.index.prior import Near
from hafloc.index.search import (
    SearchIndex,
    build_search_index,
    knn,
    load_search_index,
    params_path,
    resolve_params,
    save_search_index,
    search,
)

IN_MEMORY_FALLBACK_BYTES = 2 << 30  # a reader may search exactly in RAM while a writer rebuilds the on-disk search


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
    inliers: int | None = None  # geometrically verified local matches (None: not re-ranked)
    score: float | None = None  # re-ranking score, similarity fused with verification (None: not re-ranked)

    @property
    def path(self) -> Path:
        return Path(self.root) / self.image

    @property
    def positioned(self) -> bool:
        return self.lat is not None and self.lon is not None


class SearchFiles(PositionRows):
    """Build, save, load and query the search structure of the committed rows."""

    def _search_paths(self) -> tuple[Path, Path]:
        return self.folder / "search.faiss", self.folder / "search.ids.npy"

    def _row_set_key(self) -> tuple[int, int]:
        # ids are never reused (AUTOINCREMENT): any add raises the max id, a remove alone lowers
        # the count, so (count, max id) identifies the set of rows
        n, max_id = self._query("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM images")[0]
        return int(n), int(max_id)

    def _search_is_fresh(self) -> bool:
        index_p, ids_p = self._search_paths()
        if not (index_p.is_file() and ids_p.is_file() and params_path(index_p).is_file()):
            return False
        try:
            params = json.loads(params_path(index_p).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if not isinstance(params, dict):
            return False
        n, max_id = self._row_set_key()
        return (
            params.get("n") == n and params.get("max_id") == max_id and params.get("config") == self.info.get("search")
        )

    def rebuild_search(self, force: bool = False) -> None:
        """(Re)build the search structure from the committed descriptors, unless it is current.
        Saved only by the holder of the write lock (else kept in memory)."""
        with self._lock:
            if not force and self._search_is_fresh():
                return
            n, max_id = self._row_set_key()
            if resolve_params(n, self.dim, self.search_config)["kind"] == "ondisk":
                with self._try_writing() as writing:
                    if writing:
                        self._build_ondisk()
                        return
                # a writer is busy: search exactly in memory meanwhile, if that fits
                if n * self.dim * 4 > IN_MEMORY_FALLBACK_BYTES:
                    raise HaflocError(
                        f"{self.folder}: the on-disk search is being rebuilt by {self.lock_owner()}; "
                        "try again when it has finished"
                    )
            ids, _, desc = self.descriptors()
            key = (len(ids), int(ids.max()) if len(ids) else 0)  # exactly the rows read (see _row_set_key)
            self._search = None
            index = None
            if len(ids):
                index = build_search_index(
                    desc, self.search_config, exact=self.search_config.kind in ("auto", "ondisk")
                )
                index.params.update(max_id=int(ids.max()), config=self.info.get("search"))
            with self._try_writing() as writing:
                if writing:
                    index_p, ids_p = self._search_paths()
                    if index is None:
                        for p in (params_path(index_p), index_p, ids_p):  # JSON first: it marks the pair complete
                            p.unlink(missing_ok=True)
                    else:
                        try:
                            with atomic_path(ids_p) as tmp:
                                np.save(tmp, ids)
                            save_search_index(index, index_p)  # its JSON goes last and marks the pair complete
                        except OSError:
                            pass  # a read-only index still searches, from memory
            self._search, self._search_ids = index, (ids if index is not None else None)
            self._search_key = key

    def _id_locator(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,) int64, (chunk, row) (N, 2) int32) of every row in id order, read in batches."""
        ids, loc = [], []
        with self._lock:
            cur = self._db.execute("SELECT id, chunk, row FROM images ORDER BY id")
            while part := cur.fetchmany(100_000):
                a = np.asarray(part, np.int64)
                ids.append(a[:, 0])
                loc.append(a[:, 1:].astype(np.int32))
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, 2), np.int32)
        return np.concatenate(ids), np.concatenate(loc)

    def _build_ondisk(self) -> None:
        """Build (or resume building) the on-disk IVF-PQ over the committed rows; under the write lock."""
        from hafloc.index.ondisk import ChunkVectors, build_ondisk, ondisk_paths

        assert self._write_depth
        index_p, ids_p = self._search_paths()
        params_path(index_p).unlink(missing_ok=True)  # the files are incomplete until the JSON is back
        ids, loc = self._id_locator()
        params = resolve_params(len(ids), self.dim, self.search_config)
        index = build_ondisk(
            index_p, ChunkVectors(loc, self._chunk_path), params, progress=getattr(self, "_progress", False)
        )
        index.params.update(max_id=int(ids.max()), config=self.info.get("search"))
        with atomic_path(ondisk_paths(index_p)["rows"]) as tmp:
            np.save(tmp, loc)
        with atomic_path(ids_p) as tmp:
            np.save(tmp, ids)
        write_json_atomic(params_path(index_p), index.params)  # last: marks the files complete
        self._search, self._search_ids, self._search_key = index, ids, (len(ids), int(ids.max()))

    def _load_search(self, mmap: bool = False) -> tuple[SearchIndex, np.ndarray]:
        """The saved search structure and its ids; ``mmap``: shared read-only pages (servers)."""
        index_p, ids_p = self._search_paths()
        index = load_search_index(index_p, mmap=mmap)
        if index.kind != "ondisk":
            return index, np.load(ids_p, mmap_mode="r" if mmap else None)
        from hafloc.index.ondisk import ChunkVectors, ondisk_paths

        # ids memory-mapped, vectors read on demand: a server's RAM holds only what its queries touch
        index.vectors = ChunkVectors(np.load(ondisk_paths(index_p)["rows"], mmap_mode="r"), self._chunk_path)
        return index, np.load(ids_p, mmap_mode="r")

    def _ensure_search(self) -> SearchIndex | None:
        key = self._row_set_key()
        if self._search is not None and self._search_key == key:
            return self._search  # built or loaded for exactly these rows (saved or not)
        if self._search_is_fresh():
            try:
                self._search, self._search_ids = self._load_search(mmap=self.read_only)
                if len(self._search_ids) == self._search.ntotal:
                    self._search_key = key
                    return self._search
            except (OSError, ValueError, RuntimeError):
                pass
        if self.read_only and self._load_published_search():
            return self._search
        self.rebuild_search(force=True)
        return self._search

    def _change_stamp(self) -> tuple[int, int, int]:
        """What changes when a writer commits rows (SQLite's per-connection ``data_version``) or saves
        a search structure (its JSON is replaced last): O(1), where the rows' key is a COUNT(*) that
        costs ~40 ms per 200k rows."""
        try:
            st = params_path(self._search_paths()[0]).stat()
            saved = (st.st_ino, st.st_mtime_ns)
        except OSError:
            saved = (0, 0)
        return (int(self._query("PRAGMA data_version")[0][0]), *saved)

    def _searchable(self) -> SearchIndex | None:
        """``_ensure_search``, skipped by read-only stores while nothing changed since the last query."""
        if not self.read_only:
            return self._ensure_search()
        stamp = self._change_stamp()
        if self._search is None or stamp != self._stamp:
            self._stamp = None
            self._ensure_search()
            self._stamp = stamp
        return self._search

    def _load_published_search(self) -> bool:
        """Read-only stores (servers): map the search structure the last writer saved even if rows were
        added since (a writer still running, or killed before saving): rebuilding it in every server
        process on each committed chunk would cost N x the descriptors in RAM. The saved files are
        replaced by rename, so the mapping stays valid; rows removed since are skipped by ``search``."""
        index_p, ids_p = self._search_paths()
        try:
            params = json.loads(params_path(index_p).read_text())
            published = (int(params["n"]), int(params["max_id"]))
            if params.get("config") != self.info.get("search"):
                return False
            if self._search is not None and self._published == published:
                return True  # already mapped
            index, ids = self._load_search(mmap=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            return False
        if len(ids) != index.ntotal:
            return False
        self._search, self._search_ids, self._published = index, ids, published
        self._search_key = None  # not the rows' key: checked again (cheaply) on the next search
        return True

    def search(self, query_desc: np.ndarray, k: int = 10, near: Near | None = None) -> list[Match] | list[list[Match]]:
        """Top-k matches with metadata: a list for one (D,) query, a list of lists for (Nq, D).

        ``near``: only the photos within its radius, ranked exactly whatever the search structure."""
        q = np.asarray(query_desc, dtype=np.float32)
        single = q.ndim == 1
        q2 = np.atleast_2d(self.project(q))  # model descriptors go through the index's projection, if any
        with self._lock:
            if near is not None:
                results = self._search_near(q2, k, near)
                return results[0] if single else results
            index = self._searchable()
            if index is None:
                results = [[] for _ in q2]
            else:
                try:
                    sims, rows = search(index, q2, k)
                except FileNotFoundError:  # a compact moved the chunks the on-disk search reads: reload
                    self._search = None
                    index = self._ensure_search()
                    assert index is not None
                    sims, rows = search(index, q2, k)
                assert self._search_ids is not None
                results = self._matches(sims, rows, self._search_ids)
        return results[0] if single else results

    def _matches(self, sims: np.ndarray, rows: np.ndarray, ids_map: np.ndarray) -> list[list[Match]]:
        """``Match`` lists of search results (row -1: none); an id removed since has no row: skipped."""
        meta = self._rows_by_id(sorted({int(ids_map[r]) for r in rows.ravel() if r >= 0}))
        return [
            [
                Match(similarity=float(s), **meta[int(ids_map[r])])
                for s, r in zip(srow, rrow)
                if r >= 0 and int(ids_map[r]) in meta
            ]
            for srow, rrow in zip(sims, rows)
        ]

    def _vectors_near(self, near: Near) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 vectors) of the photos within ``near``'s radius, read from their chunks."""
        from hafloc.index.ondisk import ChunkVectors

        ids, loc = self.ids_near(near)
        vectors = ChunkVectors(loc, self._chunk_path)
        try:
            return ids, vectors(np.arange(len(ids))) if len(ids) else np.zeros((0, self.dim), np.float32)
        finally:
            vectors.close()

    def _search_near(self, q2: np.ndarray, k: int, near: Near) -> list[list[Match]]:
        """Exact top-k among the photos within ``near``'s radius."""
        try:
            ids, db = self._vectors_near(near)
        except FileNotFoundError:  # a compact moved the chunks meanwhile: read the rows again
            ids, db = self._vectors_near(near)
        if not len(ids):
            return [[] for _ in q2]
        sims, rows = knn(db, q2, k)
        return self._matches(sims, rows, ids)

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

import datetime as _dt
import hashlib
import json
import os
import re
import socket
import sqlite3
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import filelock
import numpy as np
from tqdm import tqdm

from hafloc.descriptors.result import ExtractResult
from hafloc.errors import HaflocError, InputError, ModelMismatchError, printable
from hafloc.fileio import atomic_path, write_json_atomic
from hafloc.index.compact import DTYPES, PROJECTION_FILE, Projection, check_compact, fit_sample_size, mismatch
from hafloc.index.positions import Position, make_position, resolve_position
from hafloc.index.prior import Near
from hafloc.index.search import (
    SearchConfig,
    SearchIndex,
    build_search_index,
    knn,
    load_search_index,
    params_path,
    resolve_params,
    save_search_index,
    search,
)

if TYPE_CHECKING:
    from hafloc.local import LocalFeatures

FORMAT = "hafloc-index"
VERSION = 2  # 2: images unique by (root, path), sha1 column. Version 1 indexes are read as they are
#              and migrated in place by their first writer.
LOCK_NAME = ".write.lock"
IN_MEMORY_FALLBACK_BYTES = 2 << 30  # a reader may search exactly in RAM while a writer rebuilds the on-disk search


def _env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


DEFAULT_LOCK_TIMEOUT = _env_seconds("HAFLOC_LOCK_TIMEOUT", 600.0)  # seconds a writer waits for another

_COLUMNS = """
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    root TEXT NOT NULL,
    lat REAL, lon REAL, easting REAL, northing REAL, zone INTEGER, zone_letter TEXT,
    position_source TEXT,
    added_at TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    row INTEGER NOT NULL,
    sha1 TEXT,
    UNIQUE(root, path)
"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS images ({_COLUMNS});
CREATE INDEX IF NOT EXISTS images_chunk ON images(chunk);
CREATE INDEX IF NOT EXISTS images_sha1 ON images(sha1);
"""
_V1_COLUMNS = "id, path, root, lat, lon, easting, northing, zone, zone_letter, position_source, added_at, chunk, row"


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


def file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def local_of(result: Any) -> "dict[str, LocalFeatures]":
    """The local features an extraction result carries ({} for a global-only extractor)."""
    return dict(getattr(result, "local", None) or {})


# extract_fn(paths, names) -> result with .names / .descriptors (N, D) / .failures [(name, reason)].
# It may also have ``prefetch([(paths, names), ...])``: ``add`` then announces every chunk it will ask
# for, in order, before asking (``hafloc.index.distributed`` describes them ahead on a cluster).
ExtractFn = Callable[[list[Path], list[str]], ExtractResult]
# The extraction result of callbacks that are not the model Extractor: the same record.
Extracted = ExtractResult


def extractor_fn(extractor: Any, local: Any = None) -> ExtractFn:
    """Adapt ``hafloc.descriptors.extract.Extractor`` to the store's callback (the store shows progress).

    ``local``: a ``hafloc.local`` extractor; its features of every image described globally go
    with the chunk. An image whose local extraction fails is reported and left for the next run.
    """
    if local is None:
        return lambda paths, names: extractor.extract_paths(paths, names=names, progress=False)

    def run(paths: list[Path], names: list[str]) -> Extracted:
        res = extractor.extract_paths(paths, names=names, progress=False)
        by_name = dict(zip(names, paths))
        feats: dict[str, LocalFeatures] = {}
        failures = list(res.failures)
        for name in res.names:
            try:
                feats[name] = local.extract(extractor.load(by_name[name]))
            except InputError as err:
                failures.append((name, err.cause))
        keep = [i for i, n in enumerate(res.names) if n in feats]
        return Extracted([res.names[i] for i in keep], res.descriptors[keep], failures, feats)

    return run


@dataclass
class AddReport:
    added: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unpositioned: list[str] = field(default_factory=list)  # relative paths indexed without position
    invalid_positions: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why): indexed unpositioned
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, indexed path with the same content)


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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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


def _os_lock(path: Path) -> filelock.BaseFileLock:
    """An OS (flock) lock, released by the OS when its holder dies. filelock 4 would otherwise fall
    back to a marker file on file systems without flock, which a killed holder leaves behind."""
    try:
        return filelock.FileLock(str(path), fallback_to_soft=False)
    except TypeError:  # filelock < 4 has no soft fallback to refuse
        return filelock.FileLock(str(path))


class IndexStore:
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

    def _read_schema(self) -> int:
        """0: no images table yet, 1: version 1 (path unique alone), 2: current."""
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(images)")}
        if not cols:
            return 0
        missing = {"id", "path", "root", "chunk", "row"} - cols
        if missing:
            raise sqlite3.DatabaseError(f"table images lacks column(s) {', '.join(sorted(missing))}")
        return 2 if "sha1" in cols else 1

    # -- lifecycle ---------------------------------------------------------------------------

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
            "model_path": str(Path(model_path).resolve()) if model_path else None,
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

    def _init_lock_only(self, folder: Path, lock_timeout: float | None, read_only: bool = False) -> None:
        self.folder = folder
        self.read_only = read_only
        self.lock_timeout = DEFAULT_LOCK_TIMEOUT if lock_timeout is None else float(lock_timeout)
        self._lock = threading.RLock()  # a server's worker threads share this object
        self._flock = _os_lock(folder / LOCK_NAME)
        self._write_depth = 0

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

    # -- the write lock ------------------------------------------------------------------------

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

    def _migrate_v1(self) -> None:
        """Version 1 -> 2 in one transaction: UNIQUE(path) becomes UNIQUE(root, path), sha1 added."""
        seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()
        self._db.executescript(f"""
            BEGIN IMMEDIATE;
            CREATE TABLE images_v2 ({_COLUMNS});
            INSERT INTO images_v2 ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM images;
            DROP TABLE images;
            ALTER TABLE images_v2 RENAME TO images;
            CREATE INDEX images_chunk ON images(chunk);
            CREATE INDEX images_sha1 ON images(sha1);
            UPDATE sqlite_sequence SET seq = MAX(seq, {int(seq[0]) if seq else 0}) WHERE name = 'images';
            COMMIT;
        """)
        self._schema = 2
        self.info["version"] = VERSION
        write_json_atomic(self.folder / "index.json", self.info)

    # -- properties ----------------------------------------------------------------------------

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

    # -- chunks: the commit protocol -----------------------------------------------------------

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
        for p in (self.folder / "chunks").glob(".*.partial*"):
            p.unlink(missing_ok=True)

    def _next_chunk(self) -> int:
        """A chunk id no row and no file uses (allocated under the write lock)."""
        assert self._write_depth, "chunk ids are allocated under the write lock"
        in_rows = int(self._db.execute("SELECT COALESCE(MAX(chunk), 0) FROM images").fetchone()[0])
        return max([in_rows, *self.chunk_files()]) + 1

    def _write_chunk(self, chunk: int, data: dict[str, Any]) -> None:
        """Step 1 of the protocol: every per-chunk file of ``chunk``, each atomically (temp + rename)."""
        required = {k for k, v in CHUNK_KINDS.items() if not v.optional}
        assert required <= set(data) <= set(CHUNK_KINDS), (
            f"a chunk needs data for {sorted(required)}, got {sorted(data)}"
        )
        for kind, value in data.items():
            with atomic_path(self._chunk_path(chunk, kind)) as tmp:
                CHUNK_KINDS[kind].write(tmp, value)

    def _commit_chunk(self, data: dict[str, Any], rows: Sequence[dict[str, Any]]) -> int:
        """The commit protocol: allocate a chunk id, write its files, then insert its rows (row i of
        the chunk = ``rows[i]``) in one transaction. Returns the chunk id."""
        chunk = self._next_chunk()
        self._write_chunk(chunk, data)
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
        with self._db:  # one transaction: all rows of the chunk or none
            self._db.executemany(
                f"INSERT INTO images ({', '.join(cols)}, chunk, row) VALUES ({','.join('?' * (len(cols) + 2))})",
                [tuple(r.get(c) for c in cols) + (chunk, i) for i, r in enumerate(rows)],
            )
        return chunk

    # -- building ------------------------------------------------------------------------------

    def add(
        self,
        paths: Iterable[str | Path],
        root: str | Path,
        extract_fn: ExtractFn,
        positions: dict[str, tuple[float, float]] | None = None,
        chunk_size: int = 64,
        progress: bool = True,
        rebuild: bool = True,
    ) -> AddReport:
        """Index ``paths`` (absolute, or relative to ``root``), skipping those already indexed.

        ``positions`` ({image: (lat, lon)}, e.g. from ``read_positions_csv``) take priority over
        '@' names and EXIF GPS. Images that fail extraction are reported, not indexed, and retried
        by the next ``add``. Holds the write lock throughout.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        with self._writing():
            return self._add(paths, Path(root).resolve(), extract_fn, positions, chunk_size, progress, rebuild)

    def _abs_paths(self) -> dict[str, int]:
        """{absolute path of an indexed image: id}."""
        return {
            os.path.join(py_text(r), py_text(p)): int(i) for i, r, p in self._query("SELECT id, root, path FROM images")
        }

    def _add(
        self,
        paths: Iterable[str | Path],
        root: Path,
        extract_fn: ExtractFn,
        positions: dict[str, tuple[float, float]] | None,
        chunk_size: int,
        progress: bool,
        rebuild: bool,
    ) -> AddReport:
        report = AddReport()
        todo: list[tuple[Path, str]] = []
        seen: set[str] = set()
        existing = self._abs_paths()  # by absolute path: a nested root does not index a file twice
        for p in paths:
            abs_p = Path(os.path.abspath(Path(p) if Path(p).is_absolute() else root / p))
            try:
                rel = abs_p.relative_to(root).as_posix()
            except ValueError:
                report.failed.append((str(p), f"not inside the indexed root {root}"))
                continue
            if str(abs_p) in seen:
                continue
            seen.add(str(abs_p))
            if str(abs_p) in existing:
                report.skipped_existing += 1
            else:
                todo.append((abs_p, rel))
        (self.folder / "chunks").mkdir(exist_ok=True)
        self._remove_orphan_chunks()

        prefetch = getattr(extract_fn, "prefetch", None)
        if prefetch is not None:  # e.g. a Ray actor pool: describes chunks ahead, in parallel; committed below in order
            prefetch(
                [
                    ([a for a, _ in todo[s : s + chunk_size]], [r for _, r in todo[s : s + chunk_size]])
                    for s in range(0, len(todo), chunk_size)
                ]
            )
        bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress or not todo)
        first = 0
        if todo and self.info.get("projection") and not self.info["projection"].get("fitted_on"):
            first = self._fit_projection(todo, root, extract_fn, positions, report, chunk_size, bar)
        for start in range(first, len(todo), chunk_size):
            batch = todo[start : start + chunk_size]
            self._add_chunk(batch, root, extract_fn, positions, report)
            bar.update(len(batch))
        bar.close()
        self._write_info()
        if rebuild:
            self._progress = progress  # an on-disk search build shows its progress too
            self.rebuild_search()
        return report

    def _fit_projection(
        self,
        todo: list[tuple[Path, str]],
        root: Path,
        extract_fn: ExtractFn,
        positions: dict[str, tuple[float, float]] | None,
        report: AddReport,
        chunk_size: int,
        bar: tqdm,
    ) -> int:
        """Describe the first images (the fit sample), fit the index's PCA-whitening on them and
        store it (atomically, before any row: a rerun reuses it), then commit those images.
        Returns how many of ``todo`` were handled."""
        p = self.info["projection"]
        want = fit_sample_size(int(p["input_dim"]), int(p["dim"]))
        done: list[tuple[Sequence[tuple[Path, str]], ExtractResult]] = []
        got = pos = 0
        while pos < len(todo) and got < want:
            batch = todo[pos : pos + chunk_size]
            res = extract_fn([abs_p for abs_p, _ in batch], [rel for _, rel in batch])
            done.append((batch, res))
            got += len(res.names)
            pos += len(batch)
            bar.update(len(batch))
        parts = [np.asarray(r.descriptors, np.float32) for _, r in done if len(r.names)]
        sample = np.concatenate(parts) if parts else np.zeros((0, self.input_dim), np.float32)
        if sample.ndim != 2 or sample.shape[1] != self.input_dim:
            raise ModelMismatchError(
                f"{self.folder}: extraction gave {sample.shape[-1]}-D descriptors, the index takes "
                f"{self.input_dim}-D ones"
            )
        proj = Projection.fit(sample, int(p["dim"]))
        proj.save(self.folder / PROJECTION_FILE)
        self.info["projection"] = dict(p, fitted_on=int(len(sample)))
        write_json_atomic(self.folder / "index.json", self.info)  # under the write lock (see _writing)
        self._projection = proj
        for sample_batch, res in done:
            self._add_chunk(sample_batch, root, extract_fn, positions, report, result=res)
        return pos

    def _add_chunk(
        self,
        batch: Sequence[tuple[Path, str]],
        root: Path,
        extract_fn: ExtractFn,
        positions: dict[str, tuple[float, float]] | None,
        report: AddReport,
        result: ExtractResult | None = None,
    ) -> None:
        by_name = {rel: abs_p for abs_p, rel in batch}
        if result is None:
            result = extract_fn([abs_p for abs_p, _ in batch], [rel for _, rel in batch])
        report.failed.extend((str(by_name.get(n, n)), reason) for n, reason in result.failures)
        names = list(result.names)
        if not names:
            return
        desc = np.ascontiguousarray(result.descriptors, dtype=np.float32)
        if desc.ndim != 2 or desc.shape != (len(names), self.input_dim):
            raise ModelMismatchError(
                f"{self.folder}: extraction gave descriptors of shape {desc.shape} for {len(names)} images, "
                f"the index holds {self.input_dim}-D descriptors"
            )
        if self.input_dim != self.dim:
            desc = self.project(desc)
        desc = desc.astype(self.dtype)
        rows: list[dict[str, Any]] = []
        keep: list[int] = []
        added_at = _now()
        for i, name in enumerate(names):
            if name not in by_name:
                raise ValueError(f"extraction returned {name!r}, which was not asked for")
            try:
                sha1 = file_sha1(by_name[name])
            except OSError as err:  # vanished or unreadable since it was described
                report.failed.append((str(by_name[name]), f"cannot read file ({err.strerror or err})"))
                continue
            try:
                pos: Position | None = resolve_position(by_name[name], name, positions)
            except ValueError as err:  # e.g. an '@' name with lat 999 or nan: indexed, unpositioned
                report.invalid_positions.append((name, str(err)))
                pos = None
            else:
                if pos is None:
                    report.unpositioned.append(name)
            rows.append(
                {
                    "path": db_text(name),
                    "root": db_text(str(root)),
                    "added_at": added_at,
                    "sha1": sha1,
                    **_position_columns(pos),
                }
            )
            keep.append(i)
        if not rows:
            return
        self._report_duplicates(rows, report)
        data: dict[str, Any] = {"descriptors": desc[keep]}
        if self.local_config:
            local = local_of(result)
            missing = [names[i] for i in keep if names[i] not in local]
            if missing:
                raise ValueError(
                    f"{self.folder}: the index stores local features; extraction gave none for {missing[:3]}"
                )
            data["local"] = [(names[i], local[names[i]]) for i in keep]
        self._commit_chunk(data, rows)
        report.added += len(rows)

    def _report_duplicates(self, rows: list[dict[str, Any]], report: AddReport) -> None:
        """Rows whose content (sha1) is already indexed, or repeated within ``rows``."""
        hashes = sorted({r["sha1"] for r in rows})
        known: dict[str, str] = {}
        for start in range(0, len(hashes), 500):
            part = hashes[start : start + 500]
            for h, r, p in self._query(
                f"SELECT sha1, root, path FROM images WHERE sha1 IN ({','.join('?' * len(part))})", part
            ):
                known.setdefault(h, os.path.join(py_text(r), py_text(p)))
        for r in rows:
            here = os.path.join(py_text(r["root"]), py_text(r["path"]))
            if r["sha1"] in known:
                report.duplicates.append((here, known[r["sha1"]]))
            else:
                known[r["sha1"]] = here

    def update_info(self, **fields: Any) -> None:
        """Store ``fields`` in index.json (e.g. the fitted re-ranking rule), under the write lock."""
        with self._writing():
            self.info.update(fields)
            write_json_atomic(self.folder / "index.json", self.info)

    def _write_info(self) -> None:
        n, npos = self._db.execute("SELECT COUNT(*), COUNT(lat) FROM images").fetchone()
        self.info["counts"] = {"images": int(n), "positioned": int(npos)}
        self.info["updated_at"] = _now()
        write_json_atomic(self.folder / "index.json", self.info)

    # -- upkeep --------------------------------------------------------------------------------

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

    def set_position(self, ids: Sequence[int], lat: float, lon: float) -> int:
        """Give the images ``ids`` the position (lat, lon) (validated, UTM recomputed); source 'manual'."""
        try:
            pos = make_position(float(lat), float(lon), "manual")
        except ValueError as err:
            raise HaflocError(f"{err} (lat must lie in [-90, 90], lon in [-180, 180])") from None
        cols = _position_columns(pos)
        with self._writing():
            with self._db:
                n = sum(
                    self._db.execute(
                        f"UPDATE images SET {', '.join(c + ' = ?' for c in cols)} WHERE id = ?",
                        (*cols.values(), int(i)),
                    ).rowcount
                    for i in ids
                )
            self._write_info()
        return n

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
            rewritten = dropped = 0
            for chunk, live in rows_by_chunk.items():
                files = self.chunk_files().get(chunk, {})
                data = {kind: k.read(files[kind]) for kind, k in CHUNK_KINDS.items() if kind in files or not k.optional}
                n_rows = CHUNK_KINDS["descriptors"].rows(data["descriptors"])
                if [r for _, r in live] == list(range(n_rows)):
                    continue  # nothing stale in this chunk
                keep = np.array([r for _, r in live], np.int64)
                new = self._next_chunk()
                self._write_chunk(new, {kind: CHUNK_KINDS[kind].take(v, keep) for kind, v in data.items()})
                updates.extend((new, j, i) for j, (i, _) in enumerate(live))
                rewritten += 1
                dropped += n_rows - len(live)
            with self._db:
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

    # -- reading -------------------------------------------------------------------------------

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

    @property
    def local_config(self) -> dict[str, Any] | None:
        """{"extractor", "conf"} of the stored local features, None for a global-only index."""
        local = self.info.get("local")
        return dict(local) if isinstance(local, dict) else None

    def local_features(self, ids: Sequence[int]) -> "dict[int, LocalFeatures]":
        """Stored local features of database images by id ({} for a global-only index)."""
        if not self.local_config or not len(ids):
            return {}
        from hafloc.local import read_local_features

        ids = [int(i) for i in ids]
        rows: list[tuple[int, Any, int]] = []
        for start in range(0, len(ids), 500):  # sqlite's host-parameter limit
            part = ids[start : start + 500]
            rows += self._query(f"SELECT id, path, chunk FROM images WHERE id IN ({','.join('?' * len(part))})", part)
        out: dict[int, LocalFeatures] = {}
        for image_id, path, chunk in rows:
            p = self._chunk_path(int(chunk), "local")
            try:
                out[int(image_id)] = read_local_features(p, py_text(path))
            except (OSError, KeyError, ValueError) as err:
                raise InputError(
                    p, f"local features of {printable(py_text(path))} unreadable ({err}); the index is damaged"
                ) from None
        return out

    def local_bytes_per_image(self) -> float | None:
        """Average size on disk of one image's local features (None without local features)."""
        if not self.local_config:
            return None
        n = len(self)
        size = sum(f["local"].stat().st_size for f in self.chunk_files().values() if "local" in f)
        return size / n if n else 0.0

    def images(self) -> list[dict[str, Any]]:
        """Metadata rows of all indexed images, in id order (``path`` relative to ``root``)."""
        sha1 = "sha1" if self._schema >= 2 else "NULL AS sha1"
        with self._lock:
            try:
                cur = self._db.execute(
                    "SELECT id, path, root, lat, lon, easting, northing, zone, zone_letter, position_source, added_at,"
                    f" {sha1} FROM images ORDER BY id"
                )
                cols = [c[0] for c in cur.description]
                rows = cur.fetchall()
            except sqlite3.DatabaseError as err:
                raise InputError(self.folder / "meta.sqlite", f"damaged index database ({err})") from None
        out = [dict(zip(cols, r)) for r in rows]
        for d in out:
            d["path"], d["root"] = py_text(d["path"]), py_text(d["root"])
        return out

    # -- search --------------------------------------------------------------------------------

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

    def ids_near(self, near: Near) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,), (chunk, row) (N, 2)) of the photos within ``near``'s radius, in id order."""
        cond, params = near.sql()
        rows = self._query(f"SELECT id, chunk, row, lat, lon FROM images WHERE {cond} ORDER BY id", params)
        a = np.asarray(rows, np.float64).reshape(-1, 5)
        keep = near.contains(a[:, 3], a[:, 4])
        return a[keep, 0].astype(np.int64), a[keep, 1:3].astype(np.int32)

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

    def image(self, image_id: int) -> dict[str, Any] | None:
        """Metadata row of one database image by id (None if there is no such id)."""
        return self._rows_by_id([int(image_id)]).get(int(image_id))

    def _rows_by_id(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        cols = ["id", "image", "root", "lat", "lon", "easting", "northing", "zone", "zone_letter", "position_source"]
        for start in range(0, len(ids), 500):  # sqlite's host-parameter limit
            part = ids[start : start + 500]
            for r in self._query(
                "SELECT id, path AS image, root, lat, lon, easting, northing, zone, zone_letter, position_source"
                f" FROM images WHERE id IN ({','.join('?' * len(part))})",
                part,
            ):
                d = dict(zip(cols, r))
                d["image"], d["root"] = py_text(d["image"]), py_text(d["root"])
                out[int(r[0])] = d
        return out


def _position_columns(pos: Position | None) -> dict[str, Any]:
    return {
        "lat": pos.lat if pos else None,
        "lon": pos.lon if pos else None,
        "easting": pos.easting if pos else None,
        "northing": pos.northing if pos else None,
        "zone": pos.zone if pos else None,
        "zone_letter": pos.letter if pos else None,
        "position_source": pos.source if pos else None,
    }

"""Nearest-neighbour search over L2-normalised descriptors (faiss).

``knn`` is the exact reference; ``build_search_index`` picks a scalable structure for big
databases: IVF-PQ (trained on the database itself) whose shortlist is re-ranked with exact
distances (``IndexRefineFlat``), or HNSW. ``search`` always returns cosine similarities, whatever
metric the structure uses internally.

Past RAM, kind "ondisk" (built by ``hafloc.index.ondisk``): IVF-PQ whose inverted lists live in a
memory-mapped file (faiss ``OnDiskInvertedLists``); its PQ shortlist is re-ranked exactly with
vectors read through ``SearchIndex.vectors`` (from the descriptor chunk files), so RAM holds the
coarse quantizer and PQ tables, not N x D floats.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import faiss
import numpy as np

from hafloc.fileio import atomic_path, write_json_atomic

KINDS = ("auto", "flat", "ivfpq", "hnsw", "ondisk")


def knn(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (= L2 order for unit vectors).

    Returns (similarities, indices), both (Nq, k'); k' = min(k, len(db)).
    """
    db = np.ascontiguousarray(db, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(db))
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    return index.search(queries, k)


@dataclass
class SearchConfig:
    """How to search a database. ``None`` fields are derived from the database size and dimension.

    kind: "auto" (flat up to ``threshold`` vectors, on-disk IVF-PQ above), "flat", "ivfpq" (in RAM),
    "hnsw" or "ondisk" (IVF-PQ with memory-mapped inverted lists, exact re-ranking from the chunks).
    nlist: IVF cells (default ~4*sqrt(N); on disk capped at ``max_nlist``, which bounds the cost of
    assigning vectors to cells: ~10k vectors per cell at 10M); m: PQ sub-quantizers (default: a divisor of D near D/8);
    nbits: bits per PQ code; nprobe: cells visited per query (default ~nlist/64, at least 16);
    refine_factor: exact re-ranking of refine_factor*k PQ candidates; hnsw_m, ef_search: HNSW.
    """

    kind: str = "auto"
    threshold: int = 100_000
    nlist: int | None = None
    m: int | None = None
    nbits: int = 8
    nprobe: int | None = None
    refine_factor: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    max_nlist: int = 1024

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"search kind must be one of {KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _pick_m(dim: int) -> int:
    """A divisor of ``dim`` near dim/8: 8-D sub-vectors are a good speed/accuracy point for PQ8."""
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(m - dim / 8), -m))


def resolve_params(n: int, dim: int, config: SearchConfig, exact: bool = False) -> dict[str, Any]:
    """The concrete parameters ``build_search_index`` uses for ``n`` vectors of ``dim``.

    IVF-PQ needs enough vectors to train its codebooks; below that it falls back to flat (and
    says so in ``fallback``), since for so few vectors exact search is fast anyway.
    """
    kind = config.kind
    if exact:
        kind = "flat"
    elif kind == "auto":
        kind = "ondisk" if n > config.threshold else "flat"
    params: dict[str, Any] = {"kind": kind, "n": int(n), "dim": int(dim), "requested": config.to_dict()}
    if kind in ("ivfpq", "ondisk"):
        # faiss k-means wants >= 39 training points per centroid; below that centroids are noise.
        nlist = config.nlist or max(1, min(int(round(4 * math.sqrt(n))), n // 39))
        if kind == "ondisk" and not config.nlist:
            nlist = min(nlist, config.max_nlist)
        m = config.m or _pick_m(dim)
        if dim % m:
            raise ValueError(f"PQ sub-quantizers m={m} must divide the descriptor dimension {dim}")
        # sizes given explicitly are honoured down to what k-means can fit at all
        per_centroid = 1 if config.nlist and config.m else 39
        if n < per_centroid * max(nlist, 2**config.nbits):
            return {**params, "kind": "flat", "fallback": f"{n} vectors are too few to train IVF-PQ"}
        nprobe = config.nprobe or max(16, nlist // 64)
        params.update(
            nlist=nlist,
            m=m,
            nbits=config.nbits,
            nprobe=min(nprobe, nlist),
            refine_factor=config.refine_factor,
            metric="l2",
        )
    elif kind == "hnsw":
        params.update(hnsw_m=config.hnsw_m, ef_search=config.ef_search, metric="ip")
    else:
        params.update(metric="ip")
    return params


def _apply_runtime(index: faiss.Index, params: dict[str, Any]) -> None:
    """Query-time knobs are not all serialised by faiss; set them from our JSON every time."""
    if params["kind"] == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
        # faiss's stubs type downcast_index as the base Index; it returns the concrete class
        faiss.downcast_index(index).k_factor = float(params["refine_factor"])  # type: ignore[attr-defined]
    elif params["kind"] == "ondisk":
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif params["kind"] == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(params["ef_search"])  # type: ignore[attr-defined]


@dataclass
class SearchIndex:
    """A faiss index plus the concrete parameters it was built with (saved beside it as JSON)."""

    index: faiss.Index
    params: dict[str, Any]
    # kind "ondisk": exact vectors (float32 (n, D)) of the given row ids, for re-ranking the shortlist
    vectors: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def kind(self) -> str:
        return str(self.params["kind"])


def build_search_index(
    descriptors: np.ndarray,
    config: SearchConfig | None = None,
    exact: bool = False,
    train_size: int | None = None,
    seed: int = 0,
) -> SearchIndex:
    """Build a search structure over (N, D) unit descriptors; row i gets id i.

    IVF-PQ trains on a random subset of the database (``train_size``, default 64 per cell).
    """
    config = config or SearchConfig()
    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be (N, D), got shape {x.shape}")
    n, dim = x.shape
    params = resolve_params(n, dim, config, exact=exact)
    index: faiss.Index
    if params["kind"] == "ondisk":
        raise ValueError("on-disk search is built from descriptor chunks by hafloc.index.ondisk.build_ondisk")
    if params["kind"] == "flat":
        index = faiss.IndexFlatIP(dim)
    elif params["kind"] == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(params["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
    else:
        # The refine stage keeps the raw vectors and re-ranks the PQ shortlist exactly, which
        # is what lifts top-1 agreement with exact search to ~1 at little latency cost.
        index = faiss.index_factory(dim, f"IVF{params['nlist']},PQ{params['m']}x{params['nbits']},RFlat")
        # polysemous codes are for Hamming pre-filtering, which we do not use; training them
        # costs 30x the rest of the training
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.do_polysemous_training = False  # type: ignore[attr-defined]  # an IndexIVFPQ; faiss's stubs say Index
        ntrain = min(n, train_size or 64 * int(params["nlist"]))
        rng = np.random.default_rng(seed)
        sample = x if ntrain == n else x[np.sort(rng.choice(n, ntrain, replace=False))]
        index.train(sample)
    index.add(x)
    _apply_runtime(index, params)
    return SearchIndex(index, params)


def search(index: SearchIndex | faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine similarities and row ids, both (Nq, k'), k' = min(k, ntotal); best first.

    Rows the structure could not fill (rare for IVF with a small nprobe) get id -1 and
    similarity -inf.
    """
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if isinstance(index, SearchIndex):
        if index.kind == "ondisk":
            return _search_reranked(index, q, k)
        index = index.index
    k = min(int(k), int(index.ntotal))
    if k <= 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    dist, ids = index.search(q, k)
    if index.metric_type == faiss.METRIC_L2:
        sims = 1.0 - dist / 2.0  # |a-b|^2 = 2 - 2 a.b for unit vectors
    else:
        sims = dist
    sims = np.where(ids < 0, -np.inf, sims).astype(np.float32)
    return sims, ids.astype(np.int64)


def _search_reranked(index: SearchIndex, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """PQ shortlist of refine_factor*k rows, re-ranked by exact inner products with their vectors."""
    k = min(int(k), index.ntotal)
    if k <= 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    if index.vectors is None:
        raise ValueError("an on-disk search index needs its vectors reader for exact re-ranking")
    short = min(index.ntotal, k * int(index.params["refine_factor"]))
    _, cand = index.index.search(q, short)
    sims = np.full((len(q), k), -np.inf, np.float32)
    ids = np.full((len(q), k), -1, np.int64)
    for i, row in enumerate(cand):
        row = row[row >= 0]
        if not len(row):
            continue
        exact = index.vectors(row) @ q[i]
        order = np.argsort(-exact, kind="stable")[:k]
        sims[i, : len(order)], ids[i, : len(order)] = exact[order], row[order]
    return sims, ids


@contextmanager
def c_stdout_to_stderr() -> Iterator[None]:
    """faiss's on-disk lists print progress with C printf; keep it off stdout (which may carry JSON)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def save_search_index(index: SearchIndex, path: str | Path) -> None:
    """Write the faiss index to ``path`` and its parameters to ``path`` + ``.json`` (both atomic).

    The JSON is written last, so a reader that finds JSON and index agreeing on ``n`` knows the
    pair is complete.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        faiss.write_index(index.index, str(tmp))
    write_json_atomic(params_path(path), index.params)


def params_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def load_search_index(path: str | Path, mmap: bool = False) -> SearchIndex:
    """Read an index written by ``save_search_index`` and re-apply its query-time parameters.

    ``mmap``: map the file read-only instead of copying it (where faiss has ``IO_FLAG_MMAP_IFC``:
    zero-copy for flat, IVF-PQ + refine and HNSW), so processes serving one index share its pages
    through the page cache; the file must then only ever be replaced by rename (``atomic_path``).
    """
    path = Path(path)
    params = json.loads(params_path(path).read_text())
    if params.get("kind") == "ondisk":
        # the inverted lists stay on disk, memory-mapped read-only; the faiss file names them by
        # the absolute path they were built at: a moved index finds them beside it instead
        flags = faiss.IO_FLAG_READ_ONLY
        data = path.with_suffix(".ivfdata").resolve()
        if params.get("ivfdata") != str(data):
            flags |= faiss.IO_FLAG_ONDISK_SAME_DIR
        with c_stdout_to_stderr():
            index = faiss.read_index(str(path.resolve()), flags)
    else:
        flag = getattr(faiss, "IO_FLAG_MMAP_IFC", None) if mmap else None
        index = faiss.read_index(str(path), flag) if flag is not None else faiss.read_index(str(path))
    if int(index.ntotal) != int(params["n"]):
        raise ValueError(f"{path}: index holds {index.ntotal} vectors, its parameters say {params['n']}")
    _apply_runtime(index, params)
    return SearchIndex(index, params)

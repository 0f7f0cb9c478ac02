"""Search past RAM: IVF-PQ with memory-mapped inverted lists, built from descriptor chunk files.

Files (beside ``search.faiss``, in the index folder)::

    search.trained.faiss (+ .json)  coarse quantizer + PQ codebooks, trained once on a sample
    search.blocks/block_*.faiss     the PQ codes of one range of rows (resume points of a build)
    search.ivfdata                  every block's lists merged: faiss OnDiskInvertedLists, mmapped
    search.faiss                    the index header naming search.ivfdata
    search.rows.npy                 (N, 2) int32: chunk and row of each search row, for re-ranking

Building reads ``block_rows`` vectors at a time (bounded memory). Each block is written atomically
and named by a digest of the rows it covers, so a killed build resumes from its last block, and a
rebuild after an append re-encodes only the new rows' blocks. Serving needs the quantizer, the PQ
tables and the pages of the lists a query probes; the shortlist is re-ranked with exact vectors
read from the chunk files by positioned reads (``ChunkVectors``: the page cache holds them, not
the process).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np
from tqdm import tqdm

from hafloc.fileio import atomic_path, write_json_atomic
from hafloc.index.search import SearchIndex, _apply_runtime, c_stdout_to_stderr

TRAIN_BYTES = 1 << 30  # training sample cap (float32): ~1 GB whatever the dimension
BLOCK_BYTES = 256 << 20  # float32 vectors encoded per block


def ondisk_paths(index_p: Path) -> dict[str, Path]:
    """The files of an on-disk search next to ``index_p`` (``search.faiss``)."""
    stem = index_p.with_suffix("")
    return {
        "trained": stem.with_name(stem.name + ".trained.faiss"),
        "blocks": stem.with_name(stem.name + ".blocks"),
        "ivfdata": index_p.with_suffix(".ivfdata"),
        "rows": stem.with_name(stem.name + ".rows.npy"),
    }


class ChunkVectors:
    """Float32 rows of many ``.npy`` chunk files (float16 or float32), read on demand.

    ``locator[i] = (chunk, row)`` places search row i; ``path_of(chunk)`` names its file. Rows are
    read with positioned reads (``os.pread``) rather than through a memory map: the kernel's page
    cache holds the file either way, but pages of a map count in the process's resident set (and
    a fault maps its neighbours too), so a server re-ranking random rows of a 5 GB file would look
    5 GB big. At most ``max_open`` files stay open (least recently used closed).
    """

    def __init__(self, locator: np.ndarray, path_of: Callable[[int], Path], max_open: int = 256):
        self.locator = locator
        self.path_of = path_of
        self.max_open = max_open
        self._files: OrderedDict[int, tuple[int, int, np.dtype, int]] = OrderedDict()  # fd, offset, dtype, dim

    def _open(self, chunk: int) -> tuple[int, int, np.dtype, int]:
        f = self._files.get(chunk)
        if f is not None:
            self._files.move_to_end(chunk)
            return f
        path = self.path_of(chunk)
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
        if len(shape) != 2 or fortran:
            raise ValueError(f"{path}: not a (N, D) C-order descriptor chunk")
        f = (os.open(path, os.O_RDONLY), offset, np.dtype(dtype), int(shape[1]))
        self._files[chunk] = f
        if len(self._files) > self.max_open:
            os.close(self._files.popitem(last=False)[1][0])
        return f

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1][0])

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError, TypeError):
            pass

    def _rows(self, chunk: int, rows: np.ndarray) -> np.ndarray:
        """Rows of one chunk (ascending), runs of consecutive rows read at once."""
        fd, offset, dtype, dim = self._open(chunk)
        size = dim * dtype.itemsize
        out = np.empty((len(rows), dim), dtype)
        breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
        for run in np.split(np.arange(len(rows)), breaks):
            first, n = int(rows[run[0]]), len(run)
            buf = os.pread(fd, n * size, offset + first * size)
            if len(buf) != n * size:
                raise ValueError(f"{self.path_of(chunk)}: holds fewer rows than the search expects")
            out[run] = np.frombuffer(buf, dtype).reshape(n, dim)
        return out

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of search rows ``rows`` (any order), float32 (len(rows), D)."""
        loc = np.asarray(self.locator[np.asarray(rows, np.int64)])
        out: np.ndarray | None = None
        order = np.lexsort((loc[:, 1], loc[:, 0]))  # by chunk, then row: sequential reads
        chunks = loc[order, 0]
        starts = np.r_[0, np.nonzero(np.diff(chunks))[0] + 1, len(order)]
        for a, b in zip(starts[:-1], starts[1:]):
            sel = order[a:b]
            v = self._rows(int(chunks[a]), loc[sel, 1])
            if out is None:
                out = np.empty((len(loc), v.shape[1]), np.float32)
            out[sel] = v
        return out if out is not None else np.zeros((0, 0), np.float32)

    def range(self, start: int, stop: int) -> np.ndarray:
        return self(np.arange(start, stop))


def _digest(*parts: Any) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _train(
    paths: dict[str, Path], vectors: ChunkVectors, n: int, params: dict[str, Any], seed: int, progress: bool
) -> tuple[faiss.Index, str]:
    """The trained empty index (reused when one with the same parameters exists) and its key."""
    dim, nlist, m, nbits = (int(params[k]) for k in ("dim", "nlist", "m", "nbits"))
    ntrain = min(n, 64 * nlist, max(39 * max(nlist, 2**nbits), TRAIN_BYTES // (4 * dim)))
    key = _digest({"dim": dim, "nlist": nlist, "m": m, "nbits": nbits, "seed": seed, "ntrain": ntrain})
    meta = paths["trained"].with_name(paths["trained"].name + ".json")
    try:
        if json.loads(meta.read_text()).get("key") == key:
            return faiss.read_index(str(paths["trained"])), key
    except (OSError, ValueError, RuntimeError):
        pass
    rng = np.random.default_rng(seed)
    rows = np.arange(n) if ntrain == n else np.sort(rng.choice(n, ntrain, replace=False))
    sample = np.concatenate([vectors(rows[s : s + 65536]) for s in range(0, len(rows), 65536)])
    index = faiss.index_factory(dim, f"IVF{nlist},PQ{m}x{nbits}")
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = 10  # coarse k-means: 10 rounds reach the plateau of 25 at 2.5x less cost
    faiss.downcast_index(ivf).do_polysemous_training = False  # type: ignore[attr-defined]  # stubs: base Index
    if progress:
        print(f"training IVF{nlist},PQ{m}x{nbits} on {ntrain:,} vectors", flush=True)
    index.train(sample)
    with atomic_path(paths["trained"]) as tmp:
        faiss.write_index(index, str(tmp))
    write_json_atomic(meta, {"key": key, "ntrain": ntrain})  # last: marks the trained file complete
    return index, key


def build_ondisk(
    index_p: Path,
    vectors: ChunkVectors,
    params: dict[str, Any],
    seed: int = 0,
    block_rows: int | None = None,
    progress: bool = True,
) -> SearchIndex:
    """Build (or resume) the on-disk IVF-PQ over search rows 0..N-1 (N = len(vectors.locator)).

    Writes every file but the parameters JSON, which the caller writes last (with its ids), as
    ``save_search_index`` does. Returns the index opened read-only from disk.
    """
    paths = ondisk_paths(index_p)
    n = len(vectors.locator)
    dim = int(params["dim"])
    block_rows = block_rows or max(1, BLOCK_BYTES // (4 * dim))
    for p in [*index_p.parent.glob(f".{index_p.stem}.*.partial*"), *paths["blocks"].glob(".*.partial*")]:
        p.unlink(missing_ok=True)  # temp files of a killed build (the caller holds the write lock)
    trained, key = _train(paths, vectors, n, params, seed, progress)
    paths["blocks"].mkdir(exist_ok=True)
    plan = []
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        digest = _digest(key, np.ascontiguousarray(vectors.locator[start:stop]))
        plan.append((start, stop, paths["blocks"] / f"block_{start:012d}_{stop - start:09d}_{digest}.faiss"))
    todo = [b for b in plan if not b[2].is_file()]
    bar = tqdm(total=sum(b[1] - b[0] for b in todo), desc="encoding", unit="vec", disable=not progress or not todo)
    for start, stop, p in todo:
        index = faiss.clone_index(trained)
        index.add_with_ids(vectors.range(start, stop), np.arange(start, stop, dtype=np.int64))
        with atomic_path(p) as tmp:
            faiss.write_index(index, str(tmp))
        del index
        bar.update(stop - start)
    bar.close()
    keep = {p for _, _, p in plan}
    for p in paths["blocks"].glob("*"):
        if p not in keep:
            p.unlink(missing_ok=True)

    # merge the blocks' lists into one memory-mapped file (each list contiguous)
    blocks = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for _, _, p in plan]
    lists = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]  # SWIG class missing from the stubs
    for b in blocks:
        lists.push_back(faiss.extract_index_ivf(b).invlists)
    final = paths["ivfdata"].resolve()
    ivf = faiss.extract_index_ivf(trained)
    with atomic_path(final) as tmp_data, c_stdout_to_stderr():
        tmp_data.unlink(missing_ok=True)
        ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(tmp_data))
        ntotal = ondisk.merge_from_multiple(lists.data(), lists.size(), False) if plan else 0
        ondisk.filename = str(final)  # what the header records: the name it has once renamed
        ivf.replace_invlists(ondisk, True)
        ondisk.this.disown()  # type: ignore[attr-defined]  # SWIG: the index owns the lists now
        trained.ntotal = ivf.ntotal = ntotal
        with atomic_path(index_p) as tmp_index:
            faiss.write_index(trained, str(tmp_index))
        del trained, blocks
    assert ntotal == n, (ntotal, n)
    params = {**params, "ivfdata": str(final)}
    with c_stdout_to_stderr():
        index = faiss.read_index(str(index_p.resolve()), faiss.IO_FLAG_READ_ONLY)
    _apply_runtime(index, params)
    return SearchIndex(index, params, vectors)


def footprint(n: int, dim: int, params: dict[str, Any], vector_bytes: int = 4) -> dict[str, int]:
    """Estimated bytes: RAM to serve (quantizer, PQ tables, the row maps once touched) and disk."""
    if params.get("kind") not in ("ondisk", "ivfpq"):
        return {"ram_bytes": n * dim * 4, "disk_bytes": n * dim * vector_bytes}
    nlist, m, nbits = int(params["nlist"]), int(params["m"]), int(params["nbits"])
    code = (m * nbits + 7) // 8
    lists = n * (code + 8)  # PQ codes + 64-bit ids
    ram = nlist * dim * 4 + (2**nbits) * dim * 4 + n * 8 * 2  # quantizer, codebooks, ids and row maps
    if params["kind"] == "ivfpq":
        return {"ram_bytes": ram + lists + n * dim * 4, "disk_bytes": lists + n * dim * (4 + vector_bytes)}
    return {"ram_bytes": ram, "disk_bytes": 2 * lists + n * 16 + n * dim * vector_bytes}


def disk_usage(index_p: Path) -> int:
    """Actual bytes of the on-disk search files (0 when not built)."""
    paths = ondisk_paths(index_p)
    files = [index_p, paths["trained"], paths["ivfdata"], paths["rows"]]
    if paths["blocks"].is_dir():
        files += list(paths["blocks"].iterdir())
    return sum(p.stat().st_size for p in files if p.is_file())

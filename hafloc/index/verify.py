"""``hafloc index verify``: check every file of an index folder without changing anything.

Each check reports ``ok``, ``warning`` (the index works; e.g. a stale search structure is rebuilt
at the next search, orphan chunk files go at the next write), ``damage`` (answers would be
wrong or fail: a row pointing at a missing chunk or row, a corrupt database, bad shapes, a chunk
whose content changed since it was written, a search structure holding other vectors than the
chunks) or ``skipped`` (the check could not run: chunks written before checksums were kept).
Reads only, never takes the write lock: run it while a writer works and at worst it sees that
writer's next chunk file before its rows commit (an orphan, a warning).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from hafloc.errors import HaflocError, InputError, printable
from hafloc.fileio import file_sha1
from hafloc.index.chunks import read_chunk_sums
from hafloc.index.search import load_search_index, params_path
from hafloc.index.store import CHUNK_KINDS, chunk_files, chunk_path, py_text, read_index_json


def verify_index(folder: str | Path, check_model: bool = True, check_files: bool = True) -> dict[str, Any]:
    """{"index", "ok", "damage", "warnings", "checks": [{"check", "status", "detail"}]}."""
    folder = Path(folder)
    checks: list[dict[str, str]] = []

    def report(check: str, status: str, detail: str) -> None:
        checks.append({"check": check, "status": status, "detail": detail})

    info: dict[str, Any] | None = None
    try:
        info = read_index_json(folder)
        report(
            "index.json",
            "ok",
            f"version {info.get('version', 1)}, {info['dim']}-D descriptors, model {info['model_fingerprint'][:12]}",
        )
    except InputError as err:
        report("index.json", "damage", str(err))

    rows, sums = _check_database(folder, report)
    if rows is not None and info is not None:
        counts = info.get("counts") or {}
        n, npos = len(rows), sum(r["lat"] is not None for r in rows)
        if counts.get("images") == n and counts.get("positioned") == npos:
            report("counts", "ok", f"{n} images, {npos} with a position")
        else:
            report(
                "counts",
                "warning",
                f"index.json says {counts}, the database holds {n} images, {npos} with a "
                "position (rewritten by the next write)",
            )
        _check_positions(rows, report)
        _check_chunks(
            folder,
            int(info["dim"]),
            rows,
            report,
            local=isinstance(info.get("local"), dict),
            dtype=str(info.get("dtype", "float32")),
        )
        _check_checksums(folder, rows, sums, report, local=isinstance(info.get("local"), dict))
        _check_search(folder, info, rows, report)
        _check_projection(folder, info, rows, report)
        if check_files:
            missing = [r for r in rows if not os.path.exists(os.path.join(r["root"], r["path"]))]
            if missing:
                first = os.path.join(missing[0]["root"], missing[0]["path"])
                report(
                    "image files",
                    "warning",
                    f"{len(missing)} indexed file(s) no longer exist (e.g. {printable(first)}); "
                    "'hafloc index remove --missing' drops them",
                )
            else:
                report("image files", "ok", f"all {len(rows)} indexed files exist")
    if check_model and info is not None:
        _check_model(info, report)
    damage = sum(c["status"] == "damage" for c in checks)
    return {
        "index": str(folder),
        "ok": damage == 0,
        "damage": damage,
        "warnings": sum(c["status"] == "warning" for c in checks),
        "checks": checks,
    }


def _check_database(folder: Path, report) -> tuple[list[dict[str, Any]] | None, dict[tuple[int, str], str] | None]:
    """(rows, chunk checksums or None when the index has none); (None, None) when unreadable."""
    path = folder / "meta.sqlite"
    if not path.is_file():
        report("meta.sqlite", "damage", f"{path} is missing")
        return None, None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as err:
        report("meta.sqlite", "damage", f"cannot open {path} ({err})")
        return None, None
    try:
        result = [r[0] for r in db.execute("PRAGMA integrity_check").fetchall()]
        if result != ["ok"]:
            report("meta.sqlite", "damage", "integrity_check: " + "; ".join(map(str, result[:5])))
            return None, None
        cols = {r[1] for r in db.execute("PRAGMA table_info(images)")}
        need = {"id", "path", "root", "lat", "lon", "chunk", "row"}
        if not need <= cols:
            report("meta.sqlite", "damage", f"table images lacks column(s) {', '.join(sorted(need - cols)) or 'all'}")
            return None, None
        cur = db.execute("SELECT id, root, path, chunk, row, lat, lon FROM images ORDER BY id")
        names = [c[0] for c in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
        sums = read_chunk_sums(db)
    except sqlite3.DatabaseError as err:
        report("meta.sqlite", "damage", f"{path}: {err}")
        return None, None
    finally:
        db.close()
    for r in rows:
        r["root"], r["path"] = py_text(r["root"]), py_text(r["path"])
    keys = Counter((r["root"], r["path"]) for r in rows)
    dup = [k for k, c in keys.items() if c > 1]
    if dup:
        report("meta.sqlite", "damage", f"{len(dup)} image(s) indexed twice, e.g. {printable(os.path.join(*dup[0]))}")
    else:
        report("meta.sqlite", "ok", f"integrity_check ok, schema {'2' if 'sha1' in cols else '1'}, {len(rows)} rows")
    return rows, sums


def _check_positions(rows: list[dict[str, Any]], report) -> None:
    bad = [
        r
        for r in rows
        if (r["lat"] is None) != (r["lon"] is None)
        or (r["lat"] is not None and not (-90 <= r["lat"] <= 90 and -180 <= r["lon"] <= 180))
    ]
    if bad:
        report(
            "positions",
            "damage",
            f"{len(bad)} row(s) with an invalid position, e.g. id {bad[0]['id']} ({bad[0]['lat']}, {bad[0]['lon']})",
        )
    else:
        report("positions", "ok", "every position is a valid WGS84 lat/lon")


def _check_projection(folder: Path, info: dict[str, Any], rows: list[dict[str, Any]], report) -> None:
    """The index's PCA-whitening (compact.py), when it stores projected descriptors."""
    from hafloc.index.compact import PROJECTION_FILE, Projection

    p = info.get("projection")
    if not p:
        return
    if not p.get("fitted_on"):
        report(
            "projection",
            "damage" if rows else "ok",
            "not fitted, yet rows are indexed" if rows else "fitted on the first images added",
        )
        return
    try:
        Projection.load(folder / PROJECTION_FILE, p)
        report("projection", "ok", f"{p['input_dim']} -> {p['dim']} PCA-whitening fitted on {p['fitted_on']} images")
    except InputError as err:
        report("projection", "damage", str(err))


def _check_chunks(
    folder: Path, dim: int, rows: list[dict[str, Any]], report, local: bool = False, dtype: str = "float32"
) -> None:
    """Every chunk a row points at has each file kind (local features only in a --local index)."""
    by_chunk: dict[int, list[int]] = {}
    for r in rows:
        by_chunk.setdefault(int(r["chunk"]), []).append(int(r["row"]))
    on_disk = chunk_files(folder)
    problems: list[str] = []
    stale = 0
    for chunk, used in sorted(by_chunk.items()):
        files = on_disk.get(chunk, {})
        for kind, k in CHUNK_KINDS.items():
            if k.optional and not local:
                continue
            p = files.get(kind)
            if p is None:
                problems.append(f"{len(used)} row(s) point at chunk {chunk}, whose {kind} file is missing")
                continue
            try:
                data = np.load(p, mmap_mode="r", allow_pickle=False) if kind == "descriptors" else k.read(p)
            except InputError as err:  # e.g. a local-features file lacking an image's group
                problems.append(f"{p.name}: {err.cause}")
                continue
            except (OSError, ValueError, KeyError, HaflocError) as err:
                problems.append(f"{p.name} unreadable ({err})")
                continue
            n_rows = k.rows(data)
            if kind == "descriptors":
                if data.ndim != 2 or data.shape[1] != dim or data.dtype != np.dtype(dtype):
                    problems.append(f"{p.name} is {data.dtype} {data.shape}, expected {dtype} (N, {dim})")
                    continue
                if not np.isfinite(np.asarray(data)[used if max(used) < n_rows else []]).all():
                    problems.append(f"{p.name} holds non-finite descriptors")
            if max(used) >= n_rows or min(used) < 0:
                problems.append(f"rows point at row {max(used)} of {p.name}, which holds {n_rows}")
            elif len(set(used)) != len(used):
                problems.append(f"two images share a row of {p.name}")
            elif kind == "descriptors":
                stale += n_rows - len(used)
    if problems:
        report("chunks", "damage", f"{len(problems)} problem(s): " + "; ".join(problems[:5]))
    else:
        extra = f"; {stale} stale row(s) of removed images ('hafloc index compact' drops them)" if stale else ""
        report("chunks", "ok", f"{len(by_chunk)} chunk(s), every row readable{extra}")
    orphans = sorted(set(on_disk) - set(by_chunk))
    partial = list((folder / "chunks").glob(".*.partial*")) if (folder / "chunks").is_dir() else []
    if orphans or partial:
        report(
            "orphan files",
            "warning",
            f"{len(orphans)} chunk(s) no row points at, {len(partial)} unfinished temp "
            "file(s) (a killed or running write; the next write deletes them)",
        )
    else:
        report("orphan files", "ok", "none")


def _check_checksums(
    folder: Path, rows: list[dict[str, Any]], sums: dict[tuple[int, str], str] | None, report, local: bool
) -> None:
    """Each chunk file a row uses against the SHA-1 recorded when it was written (chunks.py)."""
    on_disk = chunk_files(folder)
    files = [
        (chunk, kind, on_disk[chunk][kind])
        for chunk in sorted({int(r["chunk"]) for r in rows})
        for kind, k in CHUNK_KINDS.items()
        if (local or not k.optional) and kind in on_disk.get(chunk, {})
    ]
    known = [(c, kind, p) for c, kind, p in files if sums and (c, kind) in sums]
    if not known:
        if files:
            report(
                "checksums",
                "skipped",
                f"not available: the {len(files)} chunk file(s) were written before hafloc kept checksums",
            )
        else:
            report("checksums", "ok", "no chunk files")
        return
    assert sums is not None
    changed = []
    for c, kind, p in known:
        try:
            if file_sha1(p) != sums[(c, kind)]:
                changed.append(p.name)
        except OSError as err:
            changed.append(f"{p.name} (unreadable: {err})")
    older = len(files) - len(known)
    note = f"; {older} older chunk file(s) have none" if older else ""
    if changed:
        report(
            "checksums",
            "damage",
            f"{len(changed)} chunk file(s) changed since they were written (checksum mismatch): "
            + ", ".join(changed[:5])
            + note,
        )
    else:
        report("checksums", "ok", f"{len(known)} chunk file(s) match their checksums{note}")


def _check_search(folder: Path, info: dict[str, Any], rows: list[dict[str, Any]], report) -> None:
    index_p, ids_p = folder / "search.faiss", folder / "search.ids.npy"
    jp = params_path(index_p)
    if not jp.is_file():
        report("search", "ok" if not rows else "warning", "not built (built at the next search)")
        return
    try:
        params = json.loads(jp.read_text())
        assert isinstance(params, dict)
    except (OSError, ValueError, AssertionError) as err:
        report("search", "warning", f"{jp.name} unreadable ({err}); rebuilt at the next search")
        return
    ids = sorted(r["id"] for r in rows)
    fresh = (
        params.get("n") == len(ids)
        and params.get("max_id") == (ids[-1] if ids else 0)
        and params.get("config") == info.get("search")
    )
    if not fresh:
        report(
            "search",
            "warning",
            f"stale (built for {params.get('n')} images, the index holds {len(ids)}); rebuilt at the next search",
        )
        return
    try:
        index = load_search_index(index_p)
        stored = np.load(ids_p, allow_pickle=False)
    except (OSError, ValueError, RuntimeError) as err:
        report("search", "damage", f"search files unreadable ({err})")
        return
    if len(stored) != index.ntotal or sorted(stored.tolist()) != ids:
        report(
            "search",
            "damage",
            f"search files hold {index.ntotal} vectors / {len(stored)} ids that are not the index's {len(ids)} images",
        )
        return
    by_id = {int(r["id"]): (int(r["chunk"]), int(r["row"])) for r in rows}
    loc = np.array([by_id[int(i)] for i in stored], np.int64).reshape(-1, 2)
    differ = _search_differs(folder, index, loc)
    if differ is None:
        report("search", "ok", f"{index.kind} over {index.ntotal} images, consistent with the rows")
    elif isinstance(differ, str):
        report("search", "ok", f"{index.kind} over {index.ntotal} images, consistent with the rows ({differ})")
    else:
        n_bad, first = differ
        report(
            "search",
            "damage",
            f"{n_bad} of {index.ntotal} image(s) have other descriptors in the chunks than in the search "
            f"structure (e.g. id {int(stored[first])}, row {loc[first, 1]} of "
            f"{chunk_path(folder, int(loc[first, 0])).name})",
        )


def _search_differs(folder: Path, index: Any, loc: np.ndarray) -> tuple[int, int] | str | None:
    """Compare the search structure with the chunks: (how many rows differ, the first), None when all
    agree, or why they were not compared. In-RAM kinds hold exact copies of the vectors; the on-disk
    kind reads them from the chunks, so its (chunk, row) map is what must agree."""
    if index.kind == "ondisk":
        from hafloc.index.ondisk import ondisk_paths

        try:
            saved = np.load(ondisk_paths(folder / "search.faiss")["rows"], allow_pickle=False)
        except (OSError, ValueError) as err:
            return f"its row map is unreadable ({err})"
        if saved.shape != loc.shape:
            return (len(loc), 0)
        bad = np.flatnonzero((saved != loc).any(axis=1))
        return (len(bad), int(bad[0])) if len(bad) else None
    from hafloc.index.ondisk import ChunkVectors

    vectors = ChunkVectors(loc, lambda c: chunk_path(folder, c))
    n_bad, first = 0, -1
    try:
        for start in range(0, len(loc), 4096):  # bounded memory, whatever the index size
            stop = min(start + 4096, len(loc))
            a = index.index.reconstruct_n(start, stop - start)
            b = vectors(np.arange(start, stop))
            bad = np.flatnonzero((a != b).any(axis=1))
            if len(bad) and first < 0:
                first = start + int(bad[0])
            n_bad += len(bad)
    except (OSError, ValueError, RuntimeError) as err:  # chunk files the chunks check reports
        return f"not compared with the chunks: {err}"
    finally:
        vectors.close()
    return (n_bad, first) if n_bad else None


def _check_model(info: dict[str, Any], report) -> None:
    path = info.get("model_path")
    if not path:
        report("model", "warning", "the index does not record its model file (pass --model to use it)")
        return
    if path != "default" and not Path(path).is_file():  # "default": the shipped model (checked at load)
        report("model", "warning", f"model file {printable(path)} not found (moved? pass --model)")
        return
    from hafloc.descriptors.modelfile import load_model

    try:
        fp = load_model(path).fingerprint()
    except InputError as err:
        report("model", "warning", str(err))
        return
    if fp != info["model_fingerprint"]:
        report(
            "model",
            "warning",
            f"{printable(path)} now has fingerprint {fp[:12]}, the index was built with "
            f"{info['model_fingerprint'][:12]} (pass the right --model)",
        )
    else:
        report("model", "ok", f"{printable(path)} matches the fingerprint {fp[:12]}")

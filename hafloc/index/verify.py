"""``hafloc index verify``: check every file of an index folder without changing anything.

Each check reports ``ok``, ``warning`` (the index works; e.g. a stale search structure is rebuilt
at the next search, orphan chunk files go at the next write) or ``damage`` (answers would be
wrong or fail: a row pointing at a missing chunk or row, a corrupt database, bad shapes).
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

from hafloc.errors import InputError, printable
from hafloc.index.search import load_search_index, params_path
from hafloc.index.store import CHUNK_KINDS, chunk_files, py_text, read_index_json


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

    rows = _check_database(folder, report)
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


def _check_database(folder: Path, report) -> list[dict[str, Any]] | None:
    path = folder / "meta.sqlite"
    if not path.is_file():
        report("meta.sqlite", "damage", f"{path} is missing")
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as err:
        report("meta.sqlite", "damage", f"cannot open {path} ({err})")
        return None
    try:
        result = [r[0] for r in db.execute("PRAGMA integrity_check").fetchall()]
        if result != ["ok"]:
            report("meta.sqlite", "damage", "integrity_check: " + "; ".join(map(str, result[:5])))
            return None
        cols = {r[1] for r in db.execute("PRAGMA table_info(images)")}
        need = {"id", "path", "root", "lat", "lon", "chunk", "row"}
        if not need <= cols:
            report("meta.sqlite", "damage", f"table images lacks column(s) {', '.join(sorted(need - cols)) or 'all'}")
            return None
        cur = db.execute("SELECT id, root, path, chunk, row, lat, lon FROM images ORDER BY id")
        names = [c[0] for c in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
    except sqlite3.DatabaseError as err:
        report("meta.sqlite", "damage", f"{path}: {err}")
        return None
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
    return rows


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
            except (OSError, ValueError) as err:
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
    else:
        report("search", "ok", f"{index.kind} over {index.ntotal} images, consistent with the rows")


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

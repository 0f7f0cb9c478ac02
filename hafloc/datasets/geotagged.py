"""Your own geotagged photos: positions from EXIF GPS or a CSV; database/queries by sub-folder
(``database/``, ``queries/``) or a CSV column (``split``: database|query)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from hafloc.datasets.base import Dataset, Quirks
from hafloc.datasets.common import in_both, list_images, parse_float, read_csv_rows, read_text
from hafloc.datasets.geo import latlon_to_utm
from hafloc.datasets.labels import SPLIT_ALIASES
from hafloc.errors import InputError
from hafloc.images.gps import read_gps

log = logging.getLogger(__name__)

DB_DIRS = ("database", "db", "gallery", "ref", "reference")
Q_DIRS = ("queries", "query")


def _sub(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def find_position_csv(root: Path) -> Path | None:
    for p in sorted(root.glob("*.csv")):
        try:
            header = p.open(encoding="utf-8-sig").readline().strip().split(",")
        except (OSError, UnicodeDecodeError):
            continue
        if "image" in header and (
            ("lat" in header and "lon" in header) or ("easting" in header and "northing" in header)
        ):
            return p
    return None


def read_position_csv(path: Path) -> tuple[dict[str, tuple[str, float, float, Any]], str]:
    """image -> (split or '', x, y, zone) with kind 'latlon' or 'utm' (columns image,lat,lon or
    image,easting,northing,zone; optional split). Headerless 'name,lat,lon' files are read too.

    Positions must be finite (lat/lon within +-90 / +-180): else an error naming the line. An image
    on several rows: identical rows count once (a warning with the count); rows that disagree on
    the position are an error; an image both 'database' and 'query' stays a query (a warning).
    """
    lines = read_text(path).splitlines()
    first = lines[0].strip().split(",")
    out: dict[str, tuple[str, float, float, Any]] = {}
    where: dict[str, int] = {}
    repeated, both = 0, []

    def add(name: str, entry: tuple[str, float, float, Any], lineno: int, kind: str) -> None:
        nonlocal repeated
        if kind == "latlon" and not (-90.0 <= entry[1] <= 90.0 and -180.0 <= entry[2] <= 180.0):
            raise InputError(
                path, f"line {lineno}: {name}: lat/lon ({entry[1]}, {entry[2]}) out of range (+-90, +-180 degrees)"
            )
        old = out.get(name)
        if old is None:
            out[name], where[name] = entry, lineno
            return
        if old[1:] != entry[1:]:
            raise InputError(
                path,
                f"{name} has two positions: {old[1:3]} on line {where[name]} and {entry[1:3]} "
                f"on line {lineno} (fix the file)",
            )
        if old[0] == entry[0]:
            repeated += 1
        elif {old[0], entry[0]} == {"database", "query"}:
            both.append(name)
            out[name] = ("query",) + entry[1:]
        else:
            raise InputError(
                path,
                f"{name} is in split {old[0]!r} on line {where[name]} and {entry[0]!r} on line {lineno} (fix the file)",
            )

    if "image" not in first:
        # headerless name,lat,lon (e.g. Daejeon520's query.csv / database.csv)
        kind = "latlon"
        for i, ln in enumerate(lines, start=1):
            if not ln.strip():
                continue
            parts = [x.strip() for x in ln.split(",")]
            if len(parts) != 3:
                raise InputError(path, f"line {i}: expected name,lat,lon, got {len(parts)} fields")
            add(
                parts[0],
                ("", parse_float(path, parts[1], "lat", i), parse_float(path, parts[2], "lon", i), None),
                i,
                kind,
            )
    else:
        header, rows = read_csv_rows(path, required=("image",))
        kind = "latlon" if "lat" in header and "lon" in header else "utm"
        if kind == "utm" and not ("easting" in header and "northing" in header):
            raise InputError(path, "needs columns lat,lon or easting,northing,zone")
        for i, r in enumerate(rows, start=2):
            split = SPLIT_ALIASES.get(r.get("split", "").lower(), r.get("split", "").lower())
            if kind == "latlon":
                entry: tuple[str, float, float, str | None] = (
                    split,
                    parse_float(path, r["lat"], "lat", i),
                    parse_float(path, r["lon"], "lon", i),
                    None,
                )
            else:
                entry = (
                    split,
                    parse_float(path, r["easting"], "easting", i),
                    parse_float(path, r["northing"], "northing", i),
                    r.get("zone") or None,
                )
            add(r["image"], entry, i, kind)
    if repeated:
        log.warning("%s: %d repeated row(s) (same image and position) ignored; each image counts once", path, repeated)
    if both:
        log.warning(
            "%s: %d image(s) listed as both database and query (e.g. %s): kept as queries, removed from the "
            "database so that no query retrieves itself",
            path,
            len(both),
            both[0],
        )
    return out, kind


def _to_utm(path: Path, kind: str, xs: np.ndarray, ys: np.ndarray, zones: list[Any], names: list[str]):
    if kind == "latlon":
        polar = np.flatnonzero(np.abs(xs) > 84.0)
        if len(polar):
            raise InputError(
                path,
                f"{names[polar[0]]}: latitude {xs[polar[0]]} is beyond UTM's +-84 degrees "
                f"({len(polar)} image(s) like it)",
            )
        try:
            e, n, zn, zl = latlon_to_utm(xs, ys)
        except ValueError as err:
            raise InputError(path, str(err)) from None
        return np.stack([e, n], axis=1), (zn, zl)
    distinct = {str(z) for z in zones if z}
    if len(distinct) > 1:
        raise InputError(path, f"positions in several UTM zones ({', '.join(sorted(distinct))}); give lat,lon instead")
    zone = None
    if distinct:
        z = distinct.pop().strip().upper()
        zone = (int(z[:-1]), z[-1]) if z[-1:].isalpha() else (int(z), "")
    return np.stack([xs, ys], axis=1), zone


def load_geotagged(
    path: str | Path, split: str = "test", csv: str | Path | None = None, pos_threshold: float = 25.0, **_: Any
) -> Dataset:
    """Photos under ``database/`` and ``queries/`` (or a CSV ``split`` column), positions from a
    CSV beside them (``csv=`` or the first ``*.csv`` with image + lat/lon or easting/northing)
    or from EXIF GPS. Daejeon520-style ``database.csv`` + ``query.csv`` (name,lat,lon) work too.
    All positions go into one UTM zone. Photos without a position are left out and listed in
    ``quirks.skipped``."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(root, "not a folder")
    skipped: list[str] = []
    if csv is None and (root / "database.csv").is_file() and (root / "query.csv").is_file():
        db_pos, kind = read_position_csv(root / "database.csv")
        q_pos, _k = read_position_csv(root / "query.csv")
        db, q = list(db_pos), list(q_pos)
        both = in_both(root / "database.csv", db, q, log, ("database.csv", "query.csv"))
        db = [n for n in db if n not in both]
        table = {**{k: v for k, v in db_pos.items()}, **{k: v for k, v in q_pos.items()}}
        src = root / "database.csv"
    else:
        csv_file = Path(csv) if csv is not None else find_position_csv(root)
        db_dir, q_dir = _sub(root, DB_DIRS), _sub(root, Q_DIRS)
        if csv_file is not None:
            table, kind = read_position_csv(csv_file)
            src = csv_file
            if any(v[0] for v in table.values()):
                db = [k for k, v in table.items() if v[0] == "database"]
                q = [k for k, v in table.items() if v[0] == "query"]
            elif db_dir is not None:
                db, q = [], []
                for folder, out in ((db_dir, db), (q_dir, q)):
                    for n in list_images(folder, root) if folder is not None else []:
                        (out if n in table else skipped).append(n)
            else:
                raise InputError(csv_file, "no split column and no database/ + queries/ folders")
        else:
            if db_dir is None:
                raise InputError(root, "no database/ folder and no position CSV")
            kind, src, table = "latlon", root, {}
            db, q = [], []
            for folder, out in ((db_dir, db), (q_dir, q)):
                if folder is None:
                    continue
                for n in list_images(folder, root):
                    gps = read_gps(root / n)
                    if gps is None:
                        skipped.append(n)
                        continue
                    table[n] = ("", gps[0], gps[1], None)
                    out.append(n)
    if not db:
        raise InputError(src, "no database images with a position")
    names = db + q
    xs = np.array([table[n][1] for n in names], dtype=np.float64)
    ys = np.array([table[n][2] for n in names], dtype=np.float64)
    pos, zone = _to_utm(src, kind, xs, ys, [table[n][3] for n in names], names)
    quirks = Quirks(skipped=skipped, position_source="exif" if src == root else str(src))
    if kind == "latlon":
        quirks.latlon = {
            "db": np.stack([xs[: len(db)], ys[: len(db)]], 1),
            "q": np.stack([xs[len(db) :], ys[len(db) :]], 1),
        }
    return Dataset(
        name=root.name,
        format="geotagged",
        root=root,
        db_images=db,
        q_images=q,
        db_utm=pos[: len(db)],
        q_utm=pos[len(db) :],
        pos_threshold=float(pos_threshold),
        metric="recall",
        quirks=quirks,
        utm_zone=zone,
    )

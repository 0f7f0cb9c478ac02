"""Where an indexed image was taken: from a positions CSV, an '@' file name, or EXIF GPS; and the
index's part that keeps them (``PositionRows``: the rows' positions, set, listed, found near a place).

Priority is CSV > '@' name > EXIF: a CSV is the user's explicit statement, an '@' name is a
published dataset's ground truth, EXIF is whatever the camera recorded.
"""

from __future__ import annotations

import csv
import logging
import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hafloc.datasets.atfolders import at_position_problem, parse_at_name
from hafloc.datasets.geo import latlon_to_utm, utm_to_latlon
from hafloc.errors import HaflocError, InputError
from hafloc.images.gps import read_gps
from hafloc.index.localstore import LocalFeatureStore
from hafloc.index.prior import Near
from hafloc.index.storebase import py_text

log = logging.getLogger(__name__)

SOURCES = ("csv", "at-name", "exif", "manual")  # manual: ``hafloc index set-position``


@dataclass(frozen=True)
class Position:
    """A WGS84 position, its UTM projection (None beyond UTM's +-84 degrees) and its source."""

    lat: float
    lon: float
    easting: float | None
    northing: float | None
    zone: int | None
    letter: str | None
    source: str


def make_position(lat: float, lon: float, source: str) -> Position:
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0) or math.isnan(lat) or math.isnan(lon):
        raise ValueError(f"not a WGS84 position: lat={lat}, lon={lon}")
    try:
        e, n, zn, zl = latlon_to_utm(lat, lon)
    except ValueError:  # polar: no UTM, the lat/lon still locate the image
        return Position(float(lat), float(lon), None, None, None, None, source)
    return Position(float(lat), float(lon), e, n, zn, zl, source)


def read_positions_csv(path: str | Path) -> dict[str, tuple[float, float]]:
    """Read a CSV with header ``image,lat,lon`` -> {image: (lat, lon)}.

    ``image`` is matched against the path relative to the indexed root, then the bare file name.
    An image listed twice with the same position is a warning (with counts); with different
    positions it is an error naming both lines, since either answer could be the wrong one.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip().lower() for c in (reader.fieldnames or [])]
            if not {"image", "lat", "lon"} <= set(fields):
                raise InputError(
                    path, f"positions CSV needs columns image,lat,lon; found {','.join(fields) or 'nothing'}"
                )
            out: dict[str, tuple[float, float]] = {}
            first_line: dict[str, int] = {}
            repeated = 0
            for line_no, row in enumerate(reader, start=2):
                row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
                if not row.get("image"):
                    continue
                try:
                    lat, lon = float(row["lat"]), float(row["lon"])
                except ValueError:
                    raise InputError(
                        path, f"line {line_no}: lat/lon are not numbers ({row['lat']!r}, {row['lon']!r})"
                    ) from None
                if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
                    raise InputError(path, f"line {line_no}: lat/lon out of range ({lat}, {lon})")
                image = row["image"].replace("\\", "/")
                if image in out:
                    if out[image] != (lat, lon):
                        raise InputError(
                            path,
                            f"line {line_no}: {image!r} has position ({lat}, {lon}) but line "
                            f"{first_line[image]} gives it {out[image]}; keep one of the rows",
                        )
                    repeated += 1
                    continue
                out[image], first_line[image] = (lat, lon), line_no
            if repeated:
                log.warning(
                    "%s: %d row(s) repeat an image already listed with the same position (ignored)", path, repeated
                )
            return out
    except OSError as err:
        raise InputError(path, f"cannot read positions CSV ({err.strerror or err})") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(path, f"malformed positions CSV ({err})") from None


def unused_rows(positions: dict[str, tuple[float, float]], rel_paths: list[str]) -> list[str]:
    """The CSV images that match none of ``rel_paths`` (by relative path or bare file name, as
    ``resolve_position`` looks them up): their positions would be silently unused."""
    known = set(rel_paths) | {p.rsplit("/", 1)[-1] for p in rel_paths}
    return [name for name in positions if name not in known]


def position_from_at_name(rel_path: str) -> Position | None:
    """Position encoded in an '@' file name (Pittsburgh / Tokyo / synthetic-city layout), if any.

    Raises ValueError, with the reason ``hafloc eval`` refuses the same name for, when the name has
    '@' fields whose position is unusable: easting 'abc' or 'nan', lat 999.
    """
    name = rel_path.rsplit("/", 1)[-1]
    if not name.startswith("@") or name.count("@") < 3:
        return None  # '@2x.png': not an '@' name
    try:
        info = parse_at_name(name)
    except ValueError as err:  # easting 'abc': unusable as eval finds it, not "no position"
        raise ValueError(f"{str(err).removeprefix(f'{name!r}: ')} in the '@' name") from None
    problem = at_position_problem(info)
    if problem:
        raise ValueError(f"{problem} in the '@' name")
    lat, lon = info.get("lat"), info.get("lon")
    if lat is None or lon is None:
        if info.get("zone") is None or not info.get("letter"):
            return None  # a bare easting/northing cannot be placed on the globe
        lat, lon = utm_to_latlon(info["east"], info["north"], int(info["zone"]), str(info["letter"]))
    return make_position(float(lat), float(lon), "at-name")


def position_from_exif(path: Path) -> Position | None:
    try:
        gps = read_gps(path)
    except InputError:  # an unreadable EXIF block only means "no position", never a failed image
        return None
    return make_position(gps[0], gps[1], "exif") if gps else None


def resolve_position(
    path: Path, rel_path: str, csv_positions: dict[str, tuple[float, float]] | None
) -> Position | None:
    """The best available position of one image (CSV > '@' name > EXIF), or None."""
    if csv_positions:
        hit = csv_positions.get(rel_path) or csv_positions.get(rel_path.rsplit("/", 1)[-1])
        if hit is not None:
            return make_position(hit[0], hit[1], "csv")
    return position_from_at_name(rel_path) or position_from_exif(path)


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


class PositionRows(LocalFeatureStore):
    """The images' rows and their positions: set them, list them, find those near a place."""

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

    def ids_near(self, near: Near) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,), (chunk, row) (N, 2)) of the photos within ``near``'s radius, in id order."""
        cond, params = near.sql()
        rows = self._query(f"SELECT id, chunk, row, lat, lon FROM images WHERE {cond} ORDER BY id", params)
        a = np.asarray(rows, np.float64).reshape(-1, 5)
        keep = near.contains(a[:, 3], a[:, 4])
        return a[keep, 0].astype(np.int64), a[keep, 1:3].astype(np.int32)

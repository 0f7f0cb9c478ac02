"""SF-0 (San Francisco Landmark dataset), both protocols in circulation.

Layout read (``<root>``):
  - ``database/``: PCI images named ``PCI_sp_<id>_<lat>_<lon>_...jpg`` (the position is in the name);
  - ``queries/``: query images;
  - building-ID protocol (803 queries): ``cartoid_groundTruth.txt`` ("<query> id id ...") and
    ``db_building_ids.txt`` ("<db image> id id ..."); a query is right when a retrieved
    image shares a building id with it;
  - posed protocol (598 queries): ``query_poses.csv`` (image,lat,lon); scored at 25 m.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from hafloc.datasets.base import Dataset, Quirks
from hafloc.datasets.common import list_images, parse_float, read_csv_rows
from hafloc.datasets.geo import latlon_to_utm
from hafloc.errors import InputError

_PCI = re.compile(r"^PCI_sp_\d+_(-?\d+\.\d+)_(-?\d+\.\d+)_")
BUILDING_GT = "cartoid_groundTruth.txt"
DB_BUILDINGS = "db_building_ids.txt"
POSES = "query_poses.csv"


def is_sf0_layout(root: Path) -> bool:
    return (
        root.is_dir() and ((root / BUILDING_GT).is_file() or (root / POSES).is_file()) and (root / "database").is_dir()
    )


def _id_lists(path: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read ({e.__class__.__name__})") from None
    for i, ln in enumerate(lines, start=1):
        parts = ln.replace(",", " ").split()
        if not parts:
            continue
        if len(parts) < 2:
            raise InputError(path, f"line {i}: '<image> id ...' expected")
        out[Path(parts[0]).name] = set(parts[1:])
    return out


def pci_latlon(name: str) -> tuple[float, float] | None:
    m = _PCI.match(Path(name).name)
    return (float(m.group(1)), float(m.group(2))) if m else None


def load_sf0(path: str | Path, split: str = "test", protocol: str | None = None, **_: Any) -> Dataset:
    """Read SF-0 with ``protocol`` 'building' or 'posed' (default: building if its files exist)."""
    root = Path(path)
    if protocol is None:
        protocol = "building" if (root / BUILDING_GT).is_file() else "posed"
    db = list_images(root / "database", root)
    if not db:
        raise InputError(root / "database", "no images")
    q_dir = root / "queries"
    if protocol == "building":
        gt = _id_lists(root / BUILDING_GT)
        db_ids = _id_lists(root / DB_BUILDINGS)
        q_all = {Path(n).name: n for n in list_images(q_dir, root)} if q_dir.is_dir() else {}
        q = [q_all.get(k, f"queries/{k}") for k in sorted(gt)]
        inverted: dict[str, list[int]] = {}
        for i, n in enumerate(db):
            for b in db_ids.get(Path(n).name, ()):
                inverted.setdefault(b, []).append(i)
        positives = [
            np.unique(np.asarray([i for b in gt[k] for i in inverted.get(b, [])], dtype=np.int64)) for k in sorted(gt)
        ]
        return Dataset(
            name="sf0-building",
            format="sf0",
            root=root,
            db_images=db,
            q_images=q,
            positives=positives,
            pos_threshold=0.0,
            metric="recall",
            quirks=Quirks(protocol="SF-0 building-ID ground truth", q_building_ids=[sorted(gt[k]) for k in sorted(gt)]),
        )
    if protocol != "posed":
        raise ValueError("protocol must be 'building' or 'posed'")
    _header, rows = read_csv_rows(root / POSES, required=("image", "lat", "lon"))
    q = [r["image"] if "/" in r["image"] else f"queries/{r['image']}" for r in rows]
    q_ll = np.array(
        [
            [parse_float(root / POSES, r["lat"], "lat", i), parse_float(root / POSES, r["lon"], "lon", i)]
            for i, r in enumerate(rows, start=2)
        ]
    ).reshape(-1, 2)
    db_pts: list[tuple[float, float]] = []
    for n in db:
        ll = pci_latlon(n)
        if ll is None:
            raise InputError(root / n, "database name does not carry a position (PCI_sp_<id>_<lat>_<lon>_...)")
        db_pts.append(ll)
    db_ll = np.asarray(db_pts)
    e, nn, zn, zl = latlon_to_utm(np.r_[db_ll[:, 0], q_ll[:, 0]], np.r_[db_ll[:, 1], q_ll[:, 1]])
    pos = np.stack([e, nn], 1)
    return Dataset(
        name="sf0-posed",
        format="sf0",
        root=root,
        db_images=db,
        q_images=q,
        db_utm=pos[: len(db)],
        q_utm=pos[len(db) :],
        pos_threshold=25.0,
        metric="recall",
        utm_zone=(zn, zl),
        quirks=Quirks(protocol="SF-0 posed queries at 25 m"),
    )

"""'@' folder layout of VPR-datasets-downloader / the deep-visual-geo-localization benchmark.

``<root>/images/{train,val,test}/{database,queries}/@east@north@zone@letter@lat@lon@pano@tile@
heading@pitch@roll@height@timestamp@note@.jpg``
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hafloc.datasets.base import Dataset, Quirks
from hafloc.datasets.common import list_images
from hafloc.datasets.geo import utm_to_latlon
from hafloc.errors import InputError

AT_FIELDS = (
    "east",
    "north",
    "zone",
    "letter",
    "lat",
    "lon",
    "pano",
    "tile",
    "heading",
    "pitch",
    "roll",
    "height",
    "timestamp",
    "note",
)
_FLOATS = {"east", "north", "lat", "lon", "heading", "pitch", "roll", "height"}
SPLITS = ("train", "val", "test")


def at_name(
    easting: float,
    northing: float,
    zone: int,
    letter: str,
    pano: str = "",
    heading: float | None = None,
    pitch: float | None = None,
    height: float | None = None,
    timestamp: str = "",
    note: str = "",
) -> str:
    """A file name in the '@' layout (the inverse of :func:`parse_at_name`), lat/lon filled from the UTM position."""
    lat, lon = utm_to_latlon(easting, northing, zone, letter)
    fields = [
        f"{easting:.2f}",
        f"{northing:.2f}",
        str(zone),
        letter,
        f"{lat:.6f}",
        f"{lon:.6f}",
        pano,
        "",
        "" if heading is None else f"{heading:.1f}",
        "" if pitch is None else f"{pitch:.1f}",
        "",
        "" if height is None else f"{height:.1f}",
        timestamp,
        note,
    ]
    for v in fields:
        if "@" in v or "/" in v:
            raise ValueError(f"'@' field may not contain '@' or '/': {v!r}")
    return "@" + "@".join(fields) + "@.jpg"


def parse_at_name(name: str) -> dict[str, Any]:
    """Fields of an '@' file name (a bare name or a path); empty or absent fields are None.

    Numbers become float (``zone`` int); ``pano``, ``tile``, ``timestamp``, ``note``, ``letter``
    stay strings. Raises ValueError if the name is not '@'-encoded or easting/northing are not numbers.
    """
    base = Path(name).name
    if not base.startswith("@"):
        raise ValueError(f"{base!r} is not an '@' name (must start with '@')")
    parts = base.split("@")[1:]
    if len(parts) < 3:
        raise ValueError(f"{base!r} has fewer than two '@' fields")
    values = parts[:-1]  # the last part is the extension ('.jpg')
    if len(values) > len(AT_FIELDS):
        values = values[: len(AT_FIELDS) - 1] + ["@".join(values[len(AT_FIELDS) - 1 :])]
    out: dict[str, Any] = {k: None for k in AT_FIELDS}
    for key, raw in zip(AT_FIELDS, values):
        if raw == "":
            continue
        if key in _FLOATS:
            try:
                out[key] = float(raw)
            except ValueError:
                if key in ("east", "north"):
                    raise ValueError(f"{base!r}: {key} {raw!r} is not a number") from None
                out[key] = None
        elif key == "zone":
            try:
                out[key] = int(float(raw))
            except ValueError:
                out[key] = None
        else:
            out[key] = raw
    if out["east"] is None or out["north"] is None:
        raise ValueError(f"{base!r}: easting/northing fields are empty")
    out["extension"] = parts[-1]
    return out


def at_position_problem(fields: dict[str, Any]) -> str | None:
    """Why the position fields of a parsed '@' name are unusable, or None: easting/northing must be
    finite, lat/lon (when given) within +-90 / +-180 degrees."""
    for key in ("east", "north", "lat", "lon"):
        v = fields.get(key)
        if v is not None and not np.isfinite(v):
            return f"{key} {v} is not a finite number"
    lat, lon = fields.get("lat"), fields.get("lon")
    if lat is not None and not -90.0 <= lat <= 90.0:
        return f"lat {lat} is out of range (+-90 degrees)"
    if lon is not None and not -180.0 <= lon <= 180.0:
        return f"lon {lon} is out of range (+-180 degrees)"
    return None


def _read_side(folder: Path, root: Path) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
    names = list_images(folder, root)
    fields = []
    bad: list[tuple[str, str]] = []
    for n in names:
        try:
            f = parse_at_name(n)
        except ValueError as e:
            raise InputError(root / n, str(e)) from None
        problem = at_position_problem(f)
        if problem:
            bad.append((n, problem))
        fields.append(f)
    if bad:  # the published ground truth is broken: refuse (dropping would change the benchmark)
        more = f" ({len(bad)} images like it in {folder.name}/)" if len(bad) > 1 else ""
        raise InputError(root / bad[0][0], f"{bad[0][1]}{more}")
    utm = np.array([[f["east"], f["north"]] for f in fields], dtype=np.float64).reshape(-1, 2)
    return names, utm, fields


def find_split_dir(path: Path, split: str) -> Path:
    """The folder holding database/ and queries/ for ``split`` (``path`` may be the root,
    its images/ folder, or the split folder itself)."""
    if (path / "database").is_dir() or (path / "queries").is_dir():
        return path
    for cand in (path / "images" / split, path / split):
        if cand.is_dir():
            return cand
    have = [s for s in SPLITS if (path / "images" / s).is_dir() or (path / s).is_dir()]
    raise InputError(path, f"no '{split}' split in this '@' dataset (found: {', '.join(have) or 'none'})")


def is_at_layout(path: Path) -> bool:
    if not path.is_dir():
        return False
    for base in (path, path / "images"):
        for split in ("",) + SPLITS:
            d = base / split if split else base
            for side in ("database", "queries"):
                sd = d / side
                if sd.is_dir() and any(p.name.startswith("@") for p in sd.iterdir()):
                    return True
    return False


def _apply_protocol(split_dir: Path, quirks: Quirks, db_f: list[dict], q_f: list[dict]) -> None:
    """A split's ``protocol.json`` (written by ``hafloc dataset prepare``): ``"exclude_same":
    "timestamp"`` scores each query only against database images of another capture time (the
    '@' timestamp field; TokyoTM's rule). Images without a timestamp are never excluded."""
    f = split_dir / "protocol.json"
    if not f.is_file():
        return
    try:
        proto = json.loads(f.read_text(encoding="utf-8"))
        rule = proto.get("exclude_same")
    except (OSError, ValueError, AttributeError) as err:
        raise InputError(f, f"not a readable protocol file ({err})") from None
    if rule not in (None, "timestamp"):
        raise InputError(f, f"unknown 'exclude_same' rule {rule!r} (known: timestamp)")
    if rule == "timestamp":

        def stamps(fields: list[dict], side: str) -> list[str]:
            return [str(x["timestamp"]) if x["timestamp"] else f"\0{side}{i}" for i, x in enumerate(fields)]

        quirks.timestamps = {"db": np.array(stamps(db_f, "d")), "q": np.array(stamps(q_f, "q"))}
    quirks.protocol = str(proto.get("description") or "") or None


def load_at_folders(path: str | Path, split: str = "test", **_: Any) -> Dataset:
    """Read one split of an '@' dataset: positions from the names, 25 m threshold."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "not a folder")
    split_dir = find_split_dir(path, split)
    db_dir, q_dir = split_dir / "database", split_dir / "queries"
    if not db_dir.is_dir():
        raise InputError(split_dir, "no database/ folder")
    db, db_utm, db_f = _read_side(db_dir, split_dir)
    if q_dir.is_dir():
        q, q_utm, q_f = _read_side(q_dir, split_dir)
    else:
        q, q_utm, q_f = [], np.zeros((0, 2)), []
    if not db:
        raise InputError(db_dir, "no images")
    zones = {(f["zone"], f["letter"]) for f in db_f + q_f if f["zone"] is not None}
    quirks = Quirks(db_notes=[f["note"] for f in db_f], q_notes=[f["note"] for f in q_f])
    if len(zones) > 1:
        quirks.mixed_utm_zones = sorted(map(str, zones))
    zone = next(iter(zones)) if len(zones) == 1 else None
    ts = [f["timestamp"] for f in db_f + q_f]
    if ts and all(t is not None for t in ts):
        quirks.capture_times = {"db": [f["timestamp"] for f in db_f], "q": [f["timestamp"] for f in q_f]}
    _apply_protocol(split_dir, quirks, db_f, q_f)
    name = path.name if path.name not in SPLITS + ("images",) else path.parent.name
    return Dataset(
        name=f"{name}-{split_dir.name}" if split_dir != path else name,
        format="at",
        root=split_dir,
        db_images=db,
        q_images=q,
        db_utm=db_utm,
        q_utm=q_utm,
        pos_threshold=25.0,
        metric="recall",
        quirks=quirks,
        utm_zone=zone,
    )

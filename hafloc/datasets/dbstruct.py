"""NetVLAD ``dbStruct`` .mat files (Pitts30k/250k, Tokyo 24/7, TokyoTM and variants in the wild)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from hafloc.datasets.base import Dataset, Quirks, check_positions
from hafloc.datasets.common import swap_missing_ext
from hafloc.errors import InputError

# Field orders of the unnamed (cell) variants, by field count.
_POSITIONAL = {
    10: [
        "whichSet",
        "dbImageFns",
        "utmDb",
        "qImageFns",
        "utmQ",
        "numImages",
        "numQueries",
        "posDistThr",
        "posDistSqThr",
        "nonTrivPosDistSqThr",
    ],
    12: [
        "whichSet",
        "dbImageFns",
        "utmDb",
        "dbTimeStamp",
        "qImageFns",
        "utmQ",
        "qTimeStamp",
        "numImages",
        "numQueries",
        "posDistThr",
        "posDistSqThr",
        "nonTrivPosDistSqThr",
    ],
    8: ["dbImageFns", "utmDb", "qImageFns", "utmQ", "numImages", "numQueries", "posDistThr", "posDistSqThr"],
}
_ALIASES = {"numDb": "numImages", "numQ": "numQueries"}
_PITTS_QUERY = re.compile(r"^\d{6}_pitch\d+_yaw\d+\.\w+$")
_TOKYO_CUTOUT = re.compile(r"^(?P<pano>.+)_(?P<pitch>\d{3})_(?P<yaw>\d{3})\.\w+$")


def _strings(path: Path, v: Any, field: str) -> list[str]:
    arr = np.asarray(v, dtype=object).ravel()
    out: list[str] = []
    for x in arr:
        while isinstance(x, np.ndarray):
            if x.size != 1:
                if x.dtype.kind in "US" and x.ndim == 1:
                    break
                raise InputError(path, f"dbStruct field {field} holds a non-string entry")
            x = x.ravel()[0]
        if isinstance(x, np.ndarray):
            out.extend(str(s).strip() for s in x)
        elif isinstance(x, (str, np.str_, bytes)):
            out.append((x.decode() if isinstance(x, bytes) else str(x)).strip())
        else:
            raise InputError(path, f"dbStruct field {field} holds a non-string entry ({type(x).__name__})")
    return out


def _scalar(path: Path, v: Any, field: str) -> float:
    a = np.asarray(v).ravel()
    if a.size != 1 or a.dtype.kind not in "iuf":
        raise InputError(path, f"dbStruct field {field} is not a number")
    return float(a[0])


def _positions(path: Path, v: Any, n: int, field: str) -> np.ndarray:
    """(n, 2) positions from 2xN, Nx2 or 1xN (frame index) arrays."""
    a = np.asarray(v)
    if a.dtype.kind not in "iuf":
        raise InputError(path, f"dbStruct field {field} is not numeric")
    a = a.astype(np.float64)
    if a.size == 0 and n == 0:
        return np.zeros((0, 2))
    if a.ndim == 2 and 1 in a.shape and a.size == n:
        return np.stack([a.ravel(), np.zeros(n)], axis=1)  # 1-D track positions (frame indices)
    if a.ndim == 2 and a.shape == (2, n):  # NetVLAD stores 2xN; (2,2) is read that way too
        return a.T.copy()
    if a.ndim == 2 and a.shape == (n, 2):
        return a.copy()
    raise InputError(path, f"dbStruct field {field} has shape {a.shape}, expected 2x{n}")


def _fields(path: Path, s: np.ndarray) -> dict[str, Any]:
    s = np.asarray(s)
    if s.dtype.names:
        rec = s.ravel()[0]
        return {_ALIASES.get(n, n): rec[n] for n in s.dtype.names}
    cells = list(s.ravel())
    if len(cells) in _POSITIONAL:
        return dict(zip(_POSITIONAL[len(cells)], cells))
    raise InputError(
        path, f"dbStruct is an unnamed {len(cells)}-field cell; known layouts have {sorted(_POSITIONAL)} fields"
    )


def default_image_root(mat_path: Path) -> Path:
    # pytorch-NetVLAD layout: <root>/datasets/pitts30k_test.mat with images under <root>.
    return mat_path.parent.parent if mat_path.parent.name == "datasets" else mat_path.parent


def tokyo_panorama_ids(names: list[str]) -> np.ndarray | None:
    """Panorama id per Tokyo 24/7 cutout ('<dir>/<panoid>_<pitch>_<yaw>.jpg'); None if not that layout."""
    ids = []
    for n in names:
        p = Path(n)
        m = _TOKYO_CUTOUT.match(p.name)
        if m is None:
            return None
        ids.append(f"{p.parent.as_posix()}/{m['pano']}")
    return np.asarray(ids)


def tokyo_query_conditions(num_q: int) -> list[str]:
    """Tokyo 24/7 queries: 1-based index mod 3 -> 1 day, 2 sunset, 0 night."""
    return [("night", "day", "sunset")[(i + 1) % 3] for i in range(num_q)]


def load_dbstruct(
    path: str | Path, split: str = "test", image_root: str | Path | None = None, tokyo_nms: bool | None = None, **_: Any
) -> Dataset:
    """Read a NetVLAD-style dbStruct (.mat / seqNet .db) by field name, or by position for
    the unnamed 8/10/12-field cells.

    Positions become easting/northing (northing-first files are detected and swapped; 1xN
    frame-index tracks become (index, 0)). Pittsburgh query names get 'queries_real/'. Tokyo 24/7
    cutout names give panorama ids for NMS (``tokyo_nms`` forces it on/off; default: on when the
    names follow the cutout pattern and there are no timestamps). TokyoTM timestamps go to
    ``quirks.timestamps``. ``split`` is ignored (a dbStruct file is one split).
    """
    path = Path(path)
    try:
        mat = scipy.io.loadmat(str(path))
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except Exception as e:  # scipy raises a zoo of errors on truncated/garbled files
        raise InputError(path, f"not a readable MATLAB .mat file ({e.__class__.__name__}: {str(e)[:80]})") from None
    if "dbStruct" not in mat:
        keys = [k for k in mat if not k.startswith("__")]
        raise InputError(path, f"no 'dbStruct' variable (found: {', '.join(keys) or 'none'})")
    f = _fields(path, mat["dbStruct"])
    for need in ("dbImageFns", "qImageFns", "utmDb", "utmQ"):
        if need not in f:
            raise InputError(path, f"dbStruct has no field '{need}' (fields: {', '.join(f)})")
    db_names = _strings(path, f["dbImageFns"], "dbImageFns")
    q_names = _strings(path, f["qImageFns"], "qImageFns")
    for cnt, names, what in (("numImages", db_names, "database"), ("numQueries", q_names, "query")):
        if cnt in f and int(_scalar(path, f[cnt], cnt)) != len(names):
            raise InputError(path, f"{cnt}={int(_scalar(path, f[cnt], cnt))} but {len(names)} {what} names")
    db_utm = _positions(path, f["utmDb"], len(db_names), "utmDb")
    q_utm = _positions(path, f["utmQ"], len(q_names), "utmQ")
    check_positions(path, db_names, db_utm, "database")  # NaN/inf: refused here, before any extraction
    check_positions(path, q_names, q_utm, "query")
    quirks = Quirks()
    if "posDistThr" in f:
        thr = _scalar(path, f["posDistThr"], "posDistThr")
    elif "posDistSqThr" in f:
        thr = float(np.sqrt(_scalar(path, f["posDistSqThr"], "posDistSqThr")))
    else:
        raise InputError(path, "dbStruct has neither posDistThr nor posDistSqThr")
    if "nonTrivPosDistSqThr" in f:
        quirks.non_trivial_pos_dist_sq_thr = _scalar(path, f["nonTrivPosDistSqThr"], "nonTrivPosDistSqThr")
    both = np.concatenate([db_utm, q_utm])
    if len(both) and np.all(both[:, 1] == 0) and np.all(both[:, 0] == np.round(both[:, 0])):
        quirks.index_coordinates = True  # positions are frame indices along a track, not metres
    elif len(both) and np.median(both[:, 0]) > 1e6 and 1e5 <= np.median(both[:, 1]) < 1e6:
        # easting is always within 100-900 km of the zone's false origin; northing-first files exist
        db_utm, q_utm = db_utm[:, ::-1].copy(), q_utm[:, ::-1].copy()
        quirks.northing_first = True
    if "dbTimeStamp" in f or "qTimeStamp" in f:
        if not ("dbTimeStamp" in f and "qTimeStamp" in f):
            raise InputError(path, "dbStruct has only one of dbTimeStamp / qTimeStamp")
        db_ts = np.asarray(f["dbTimeStamp"]).ravel()
        q_ts = np.asarray(f["qTimeStamp"]).ravel()
        if len(db_ts) != len(db_names) or len(q_ts) != len(q_names):
            raise InputError(path, "timestamp counts do not match the image counts")
        quirks.timestamps = {"db": db_ts, "q": q_ts}
    root = Path(image_root) if image_root is not None else default_image_root(path)
    if q_names and not q_names[0].startswith("queries_real") and _PITTS_QUERY.match(Path(q_names[0]).name):
        q_names = [f"queries_real/{n}" for n in q_names]
    db_names = swap_missing_ext(root, db_names)
    q_names = swap_missing_ext(root, q_names)
    panos = tokyo_panorama_ids(db_names)
    if tokyo_nms is None:
        tokyo_nms = panos is not None and quirks.timestamps is None
    if tokyo_nms:
        if panos is None:
            raise InputError(path, "tokyo_nms asked for but database names are not '<pano>_<pitch>_<yaw>' cutouts")
        quirks.tokyo_nms = panos
        if len(q_names) == 315:
            quirks.q_conditions = tokyo_query_conditions(len(q_names))
    which = _strings(path, f["whichSet"], "whichSet")[0] if "whichSet" in f else None
    dataset_name = _strings(path, f["dataset"], "dataset")[0] if "dataset" in f else None
    quirks.which_set = which
    return Dataset(
        name=dataset_name or path.stem,
        format="dbstruct",
        root=root,
        db_images=db_names,
        q_images=q_names,
        db_utm=db_utm,
        q_utm=q_utm,
        pos_threshold=thr,
        metric="recall",
        quirks=quirks,
    )

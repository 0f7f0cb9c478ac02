"""gsv-cities / salad style ``.npy`` ground truth: ``<name>_dbImages.npy``, ``<name>_qImages.npy``
and ``<name>_gt.npy`` (positives per query), or MSLS-val's ``_qIdx.npy`` + ``_pIdx.npy``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hafloc.datasets.base import Dataset, Quirks
from hafloc.datasets.vprbench import load_gt_object_array
from hafloc.errors import InputError

SUFFIXES = ("_dbImages.npy", "_qImages.npy", "_gt.npy", "_qIdx.npy", "_pIdx.npy")


def prefixes(folder: Path) -> list[str]:
    found = set()
    for p in folder.iterdir():
        for s in SUFFIXES:
            if p.name.endswith(s):
                found.add(p.name[: -len(s)])
    return sorted(found)


def _names(path: Path) -> list[str]:
    a = load_gt_object_array(path)
    return [str(x) for x in np.ravel(a)]


def load_gsv_npy(
    path: str | Path, split: str = "test", image_root: str | Path | None = None, name: str | None = None, **_: Any
) -> Dataset:
    """Read one gsv-style set; ``path`` is one of its files or a folder holding exactly one set
    (``name=`` picks one). Names are relative to ``image_root`` (default: the folder)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if name is None:
        if path.is_file():
            name = next((path.name[: -len(s)] for s in SUFFIXES if path.name.endswith(s)), None)
            if name is None:
                raise InputError(path, f"not a gsv-style file (names end {', '.join(SUFFIXES)})")
        else:
            found = prefixes(folder)
            if len(found) != 1:
                raise InputError(
                    folder,
                    f"{len(found)} gsv-style sets here ({', '.join(found) or 'none'}); "
                    "pass the file of the one you want",
                )
            name = found[0]
    f = {s: folder / f"{name}{s}" for s in SUFFIXES}
    for need in ("_dbImages.npy", "_qImages.npy"):
        if not f[need].is_file():
            raise InputError(f[need], "missing (gsv-style sets need _dbImages.npy and _qImages.npy)")
    db, q = _names(f["_dbImages.npy"]), _names(f["_qImages.npy"])
    if f["_gt.npy"].is_file():
        gt = load_gt_object_array(f["_gt.npy"])
        positives = [np.asarray(np.ravel(p), dtype=np.int64) for p in gt]
    elif f["_qIdx.npy"].is_file() and f["_pIdx.npy"].is_file():
        q_idx = np.asarray(load_gt_object_array(f["_qIdx.npy"]), dtype=np.int64).ravel()
        positives = [np.asarray(np.ravel(p), dtype=np.int64) for p in load_gt_object_array(f["_pIdx.npy"])]
        if len(q_idx) != len(positives):
            raise InputError(f["_pIdx.npy"], f"{len(positives)} positive lists for {len(q_idx)} query indices")
        q = [q[i] for i in q_idx]
    else:
        raise InputError(f["_gt.npy"], "missing: no ground truth (_gt.npy, or _qIdx.npy + _pIdx.npy) for this set")
    if len(positives) != len(q):
        raise InputError(f["_gt.npy"], f"{len(positives)} positive lists for {len(q)} queries")
    for p in positives:
        if len(p) and (p.min() < 0 or p.max() >= len(db)):
            raise InputError(f["_gt.npy"], f"database index {int(p.max())} outside 0..{len(db) - 1}")
    root = Path(image_root) if image_root is not None else folder
    return Dataset(
        name=name,
        format="gsv_npy",
        root=root,
        db_images=db,
        q_images=q,
        positives=positives,
        pos_threshold=0.0,
        metric="recall",
        quirks=Quirks(protocol="index ground truth (.npy)"),
    )

"""Patch-NetVLAD ground truth: image-name lists + ``.npz`` (utmQ, utmDb, posDistThr)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from hafloc.datasets.base import Dataset, Quirks, check_positions
from hafloc.datasets.common import swap_missing_ext
from hafloc.datasets.dbstruct import tokyo_panorama_ids, tokyo_query_conditions
from hafloc.errors import InputError


def _read_list(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read image list ({e.__class__.__name__})") from None
    return [ln.strip().removeprefix("./") for ln in lines if ln.strip()]


def find_lists(npz: Path) -> tuple[Path, Path]:
    """Patch-NetVLAD keeps ``dataset_imagenames/<name>_imageNames_{index,query}.txt`` next to
    ``dataset_gt_files/<name>[_split].npz``; try the stem, then shorter '_' prefixes."""
    folders = [npz.parent, npz.parent.parent / "dataset_imagenames", npz.parent / "dataset_imagenames"]
    parts = npz.stem.split("_")
    for k in range(len(parts), 0, -1):
        stem = "_".join(parts[:k])
        for d in folders:
            idx, q = d / f"{stem}_imageNames_index.txt", d / f"{stem}_imageNames_query.txt"
            if idx.is_file() and q.is_file():
                return idx, q
    raise InputError(
        npz,
        "no matching <name>_imageNames_index.txt / _query.txt found beside it or in "
        "../dataset_imagenames (pass index_list= and query_list=)",
    )


def load_patchnetvlad(
    path: str | Path,
    split: str = "test",
    index_list: str | Path | None = None,
    query_list: str | Path | None = None,
    image_root: str | Path | None = None,
    tokyo_nms: bool | None = None,
    **_: Any,
) -> Dataset:
    """Read a Patch-NetVLAD ``.npz`` and its name lists (row i of a list = row i of the UTM array).

    Names are relative to the dataset root (``image_root``; default the npz's folder's parent).
    Tokyo 24/7 cutouts get panorama ids for NMS.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(path, f"not a readable .npz ({e.__class__.__name__})") from None
    for need in ("utmQ", "utmDb", "posDistThr"):
        if need not in data:
            raise InputError(path, f"missing array '{need}' (has: {', '.join(data)})")
    if index_list is None or query_list is None:
        found_idx, found_q = find_lists(path)
        index_list = index_list or found_idx
        query_list = query_list or found_q
    db, q = _read_list(Path(index_list)), _read_list(Path(query_list))
    db_utm, q_utm = np.asarray(data["utmDb"], np.float64), np.asarray(data["utmQ"], np.float64)
    if db_utm.ndim != 2 or db_utm.shape[1] != 2 or q_utm.ndim != 2 or q_utm.shape[1] != 2:
        raise InputError(path, f"utmDb/utmQ must be Nx2, got {db_utm.shape} / {q_utm.shape}")
    if len(db) != len(db_utm):
        raise InputError(Path(index_list), f"{len(db)} names but {len(db_utm)} database positions in {path.name}")
    if len(q) != len(q_utm):
        raise InputError(Path(query_list), f"{len(q)} names but {len(q_utm)} query positions in {path.name}")
    check_positions(path, db, db_utm, "database")
    check_positions(path, q, q_utm, "query")
    root = Path(image_root) if image_root is not None else path.parent.parent
    db, q = swap_missing_ext(root, db), swap_missing_ext(root, q)
    quirks = Quirks()
    panos = tokyo_panorama_ids(db)
    if tokyo_nms or (tokyo_nms is None and panos is not None):
        if panos is None:
            raise InputError(path, "tokyo_nms asked for but database names are not Tokyo cutouts")
        quirks.tokyo_nms = panos
        if len(q) == 315:
            quirks.q_conditions = tokyo_query_conditions(len(q))
    if np.all(db_utm[:, 1] == db_utm[:, 1].astype(np.int64)) and np.issubdtype(data["utmDb"].dtype, np.integer):
        quirks.index_coordinates = True
    return Dataset(
        name=path.stem,
        format="patchnetvlad",
        root=root,
        db_images=db,
        q_images=q,
        db_utm=db_utm,
        q_utm=q_utm,
        pos_threshold=float(np.asarray(data["posDistThr"]).ravel()[0]),
        metric="recall",
        quirks=quirks,
    )

"""VPR-Bench: ``ground_truth_new.npy`` rows [query_index, [reference indices]] over query/ and ref/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hafloc.datasets.base import Dataset, Quirks
from hafloc.datasets.common import list_images
from hafloc.errors import InputError


def load_gt_object_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=True)  # the published files are pickled object arrays
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except Exception as e:
        raise InputError(path, f"not a readable .npy ({e.__class__.__name__}: {str(e)[:60]})") from None


def load_vprbench(path: str | Path, split: str = "test", **_: Any) -> Dataset:
    """Read a VPR-Bench dataset folder (or its ground_truth_new.npy).

    A reference list of [-1] marks a query without a true match (kept, with no positives).
    Images are the sorted files of query/ and ref/; when those folders are absent (ground truth
    only) names ``query/%07d.jpg`` / ``ref/%07d.jpg`` are made up, the database sized by the
    largest referenced index, and ``quirks.images_missing`` is set.
    """
    path = Path(path)
    gt_path = path / "ground_truth_new.npy" if path.is_dir() else path
    root = gt_path.parent
    gt = load_gt_object_array(gt_path)
    if gt.ndim != 2 or gt.shape[1] != 2:
        raise InputError(gt_path, f"expected rows [query_index, [ref indices]] (N x 2), got shape {gt.shape}")
    q_index, positives = [], []
    for r, (qi, refs) in enumerate(gt):
        try:
            q_index.append(int(qi))
            refs = np.asarray(list(np.ravel(refs)), dtype=np.int64)
            # VPR-Bench marks queries with no true match ("true negatives") with [-1]
            positives.append(refs[refs >= 0])
        except (TypeError, ValueError):
            raise InputError(gt_path, f"row {r}: not [int, list of ints]") from None
    order = np.argsort(q_index, kind="stable")
    q_index = [q_index[i] for i in order]
    positives = [positives[i] for i in order]
    quirks = Quirks(
        protocol="VPR-Bench index ground truth", true_negative_queries=int(sum(len(p) == 0 for p in positives))
    )
    if (root / "query").is_dir() and (root / "ref").is_dir():
        q_all, db = list_images(root / "query", root), list_images(root / "ref", root)
        if q_index and max(q_index) >= len(q_all):
            raise InputError(gt_path, f"query index {max(q_index)} but only {len(q_all)} images in query/")
        q = [q_all[i] for i in q_index]
    else:
        quirks.images_missing = True
        n_db = 1 + max((int(p.max()) for p in positives if len(p)), default=-1)
        db = [f"ref/{i:07d}.jpg" for i in range(n_db)]
        q = [f"query/{i:07d}.jpg" for i in q_index]
    for p in positives:
        if len(p) and (p.min() < 0 or p.max() >= len(db)):
            raise InputError(gt_path, f"reference index {int(p.max())} outside 0..{len(db) - 1}")
    return Dataset(
        name=root.name,
        format="vprbench",
        root=root,
        db_images=db,
        q_images=q,
        positives=positives,
        pos_threshold=0.0,
        metric="recall",
        quirks=quirks,
    )

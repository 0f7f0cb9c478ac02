"""INRIA Holidays: 1,491 images ``NNNNNN.jpg``; group = first four digits; the first image of
each group (number multiple of 100) is its query, the rest of the group its positives."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from hafloc.datasets.base import Dataset, Quirks
from hafloc.datasets.common import list_images
from hafloc.errors import InputError

_NAME = re.compile(r"^(\d{6})\.(jpg|jpeg|png)$", re.IGNORECASE)


def holidays_from_names(names: list[str], root: Path, name: str = "holidays") -> Dataset:
    """Build the Holidays protocol from image names (relative to ``root``).

    Database = all images; queries = the images whose number is a multiple of 100; positives =
    the rest of the group; junk = the query itself (so it is ignored in the ranking).
    """
    numbers = []
    for n in names:
        m = _NAME.match(Path(n).name)
        if m is None:
            raise InputError(root / n, "not a Holidays image name (six digits)")
        numbers.append(int(m.group(1)))
    order = np.argsort(numbers, kind="stable")
    names = [names[i] for i in order]
    numbers = [numbers[i] for i in order]
    groups: dict[int, list[int]] = {}
    for i, num in enumerate(numbers):
        groups.setdefault(num // 100, []).append(i)
    q_db, positives = [], []
    for g in sorted(groups):
        members = groups[g]
        first = members[0]
        if numbers[first] % 100 != 0:
            raise InputError(root / names[first], f"group {g:04d} has no query image {g:04d}00")
        q_db.append(first)
        positives.append(np.asarray(members[1:], dtype=np.int64))
    return Dataset(
        name=name,
        format="holidays",
        root=root,
        db_images=names,
        q_images=[names[i] for i in q_db],
        positives=positives,
        junk=[np.asarray([i], dtype=np.int64) for i in q_db],
        pos_threshold=0.0,
        metric="holidays",
        quirks=Quirks(q_db_index=np.asarray(q_db), max_size=(1024, 768), protocol="INRIA Holidays mAP (query ignored)"),
    )


def is_holidays_layout(root: Path) -> bool:
    folder = root / "jpg" if (root / "jpg").is_dir() else root
    if not folder.is_dir():
        return False
    names = [p.name for p in folder.iterdir()]
    good = [n for n in names if _NAME.match(n)]
    return len(good) >= 2 and len(good) >= 0.9 * len([n for n in names if not n.startswith(".")])


def load_holidays(path: str | Path, split: str = "test", variant: str | None = None, **_: Any) -> Dataset:
    """Holidays images in ``path`` or ``path/jpg`` (``variant`` names another folder, e.g. the
    up-righted 'rot' copies); files are used as they are (no EXIF rotation: the 'orig' protocol)."""
    root = Path(path)
    folder = root / variant if variant else (root / "jpg" if (root / "jpg").is_dir() else root)
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    names = list_images(folder, root, recursive=False)
    if not names:
        raise InputError(folder, "no images")
    ds = holidays_from_names(names, root, name=f"holidays-{variant or 'orig'}")
    ds.quirks.apply_exif_orientation = False
    return ds

"""Label-supervised sets: a CSV with columns image,label,split (same label = same place).

A folder's label CSV is ``dataset.csv``, else the one CSV in it whose header has ``image`` and
``label`` (any name: ``places.csv``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from hafloc.datasets.base import Dataset, Quirks, split_database
from hafloc.datasets.common import in_both, read_csv_rows
from hafloc.errors import InputError

log = logging.getLogger(__name__)

SPLIT_ALIASES = {
    "gallery": "database",
    "db": "database",
    "ref": "database",
    "reference": "database",
    "queries": "query",
    "val_gallery": "val_database",
    "val_queries": "val_query",
}
KNOWN_SPLITS = ("train", "val_database", "val_query", "database", "query")


def csv_path(path: Path) -> Path:
    """The label CSV of a folder (``dataset.csv``, else the one CSV recognised by its header)."""
    if not path.is_dir() or (path / "dataset.csv").is_file():
        return path / "dataset.csv" if path.is_dir() else path
    found = [f for f in sorted(path.glob("*.csv")) if not f.name.startswith(".") and _has_label_header(f)]
    if len(found) > 1:
        raise InputError(path, f"{len(found)} label CSVs here ({', '.join(f.name for f in found)}); pass one file")
    return found[0] if found else path / "dataset.csv"


def _has_label_header(p: Path) -> bool:
    if not p.is_file() or p.suffix.lower() != ".csv":
        return False
    try:
        with p.open(encoding="utf-8-sig") as f:
            header = [c.strip() for c in f.readline().strip().split(",")]
    except (OSError, UnicodeDecodeError):
        return False
    return "image" in header and "label" in header


def is_label_csv(path: Path) -> bool:
    """A label CSV by content (the header), whatever its name; a folder holding one."""
    return _has_label_header(csv_path(path))


def _check_duplicates(p: Path, by_split: dict[str, list[dict[str, str]]]) -> None:
    """Repeated images, in place: never silently counted twice.

    - one image with two different labels: an error (which place is it?);
    - the same row twice (image, label, split): one copy kept, a warning with the count;
    - one image as gallery and as query (same label): it stays a query and leaves the gallery
      (else the query retrieves itself at rank 1), a warning with the count; likewise for
      val_database / val_query. Other split pairs (train and test) are different sets and kept.
    """
    first: dict[str, dict[str, str]] = {}
    for rows in by_split.values():
        for r in rows:
            seen = first.setdefault(r["image"], r)
            if seen["label"] != r["label"]:
                raise InputError(
                    p,
                    f"image {r['image']!r} has label {seen['label']!r} on line {seen['line']} and "
                    f"{r['label']!r} on line {r['line']}: which place is it? (fix the file)",
                )
    repeated = 0
    for split, rows in by_split.items():
        kept: dict[str, dict[str, str]] = {}
        for r in rows:
            repeated += r["image"] in kept
            kept.setdefault(r["image"], r)
        by_split[split] = list(kept.values())
    if repeated:
        log.warning("%s: %d repeated row(s) (same image, label and split) ignored; each image counts once", p, repeated)
    for db_split, q_split, sides in (
        ("database", "query", ("gallery", "query")),
        ("val_database", "val_query", ("val_gallery", "val_query")),
    ):
        both = in_both(
            p,
            [r["image"] for r in by_split.get(db_split, [])],
            [r["image"] for r in by_split.get(q_split, [])],
            log,
            sides,
        )
        if both:
            by_split[db_split] = [r for r in by_split[db_split] if r["image"] not in both]


def load_labels(path: str | Path, split: str = "test", val_fraction: float = 0.2, seed: int = 0, **_: Any) -> Dataset:
    """Read a label CSV; images live beside it or under ``images/``.

    split 'test' -> database/gallery + query rows; 'val' -> val_database + val_query; 'train' ->
    train rows as the database (no queries). A set without train/val rows (e.g. ie_tower_floors)
    gets them from ``split_database(test set, val_fraction, seed)`` (recorded in
    ``quirks.split_from_database``).
    """
    p = csv_path(Path(path))
    _header, rows = read_csv_rows(p, required=("image", "label", "split"))
    if not rows:
        raise InputError(p, "no rows")
    by_split: dict[str, list[dict[str, str]]] = {}
    for i, r in enumerate(rows, start=2):
        s = SPLIT_ALIASES.get(r["split"].lower(), r["split"].lower())
        if s not in KNOWN_SPLITS:
            raise InputError(p, f"line {i}: unknown split {r['split']!r} (use {', '.join(KNOWN_SPLITS)} or gallery)")
        if not r["image"] or not r["label"]:
            raise InputError(p, f"line {i}: empty image or label")
        r = dict(r, split=s, line=str(i))
        by_split.setdefault(s, []).append(r)
    _check_duplicates(p, by_split)
    root = (
        p.parent / "images"
        if (p.parent / "images").is_dir() and not (p.parent / rows[0]["image"]).exists()
        else p.parent
    )

    def make(db_rows, q_rows, name):
        return Dataset(
            name=name,
            format="labels",
            root=root,
            db_images=[r["image"] for r in db_rows],
            q_images=[r["image"] for r in q_rows],
            db_labels=np.asarray([r["label"] for r in db_rows], dtype=object),
            q_labels=np.asarray([r["label"] for r in q_rows], dtype=object),
            pos_threshold=0.0,
            metric="recall",
            quirks=Quirks(protocol="same label = same place"),
        )

    base = p.parent.name
    if split == "test":
        if "database" not in by_split or "query" not in by_split:
            raise InputError(p, "split 'test' needs 'database' (or 'gallery') and 'query' rows")
        return make(by_split["database"], by_split["query"], f"{base}-test")
    if split == "val" and "val_database" in by_split and "val_query" in by_split:
        return make(by_split["val_database"], by_split["val_query"], f"{base}-val")
    if split == "train" and "train" in by_split:
        return make(by_split["train"], [], f"{base}-train")
    if split not in ("train", "val"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if "database" not in by_split:
        raise InputError(p, f"no '{split}' rows and no database rows to split")
    test = make(by_split["database"], by_split.get("query", []), base)
    train, val = split_database(test, val_fraction=val_fraction, seed=seed)
    return train if split == "train" else val

"""Builders of small datasets in their published layouts from the real photos in ../shared/data.

Shared by the tests (as fixtures) and the benchmarks: a label CSV (ie_tower_floors subset), '@'
folders (GardensPoint day vs night) and Oxford5k's jpg/ + gt/ (landmarks_mini). Images are
symlinked, never copied.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

LANDMARKS = ["london_bridge", "piazza_san_marco", "sacre_coeur", "st_pauls_cathedral", "united_states_capitol"]


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


def even(items: list, k: int) -> list:
    """``k`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if len(items) <= k:
        return list(items)
    idx = np.linspace(0, len(items) - 1, k).round().astype(int)
    return [items[i] for i in idx]


def tower_subset(shared: Path, root: Path, floors: int, gallery_per_floor: int, queries_per_floor: int) -> Path:
    """ie_tower_floors subset in its own layout: dataset.csv (image,label,split,...) + images/."""
    src = shared / "ie_tower_floors"
    with open(src / "dataset.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = sorted({r["label"] for r in rows})
    out = []
    for lab in even(labels, floors):
        for split, k in (("gallery", gallery_per_floor), ("query", queries_per_floor)):
            for r in even([r for r in rows if r["label"] == lab and r["split"] == split], k):
                link(src / "images" / r["image"], root / "images" / r["image"])
                out.append(r)
    with open(root / "dataset.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(out)
    return root


def gardens_at(shared: Path, root: Path) -> Path:
    """GardensPoint frames 0-9 as '@' folders: night = database, day = queries, place i at 100*i m east."""
    src = shared / "gardenspoint_mini"
    with open(src / "vprtutorial_first10_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        i = int(r["place_index"])
        side = "queries" if r["split"] == "query" else "database"
        # @east@north@zone@letter@lat@lon@pano@tile@heading@pitch@roll@height@timestamp@note@.jpg
        fields = [f"{500000 + 100 * i:.2f}", "6960000.00", "56", "J"] + [""] * 9 + [f"{side}{i}"]
        link(src / r["image"], root / "images" / "test" / side / ("@" + "@".join(fields) + "@.jpg"))
    return root


def triplets_at(shared: Path, root: Path) -> Path:
    """The GardensPoint/SFU triplets as '@' folders: view i0 of each place = the queries, views i1 and
    i2 = the database, place p at 100*p m east (so only its own two views are within 25 m)."""
    src = shared / "gardenspoint_mini"
    with open(src / "nicktrinh_triplets_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        p = int(r["place"].lstrip("p"))
        side = "queries" if r["view"] == "i0" else "database"
        fields = [f"{500000 + 100 * p:.2f}", "6960000.00", "56", "J"] + [""] * 9 + [f"{side}{p}{r['view']}"]
        link(src / r["image"], root / "images" / "test" / side / ("@" + "@".join(fields) + "@.jpg"))
    return root


def landmarks_oxford(shared: Path, root: Path) -> Path:
    """landmarks_mini in Oxford5k's layout: jpg/*.jpg + gt/<q>_{good,ok,junk,query}.txt, one query
    per landmark (its first photo, box = the central 80%), good/ok = the other photos of the
    landmark, junk = the query photo itself (plus one more Sacre-Coeur photo)."""
    src = shared / "landmarks_mini"
    with open(src / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        link(src / "images" / r["image"], root / "jpg" / r["image"])
    gt = root / "gt"
    gt.mkdir()
    for lm in LANDMARKS:
        mine = [r for r in rows if r["landmark"] == lm]
        q = mine[0]
        w, h = int(q["width"]), int(q["height"])
        stem = Path(q["image"]).stem
        others = [Path(r["image"]).stem for r in mine[1:]]
        junk = [stem] + (others[-1:] if lm == "sacre_coeur" else [])
        rest = [o for o in others if o not in junk]
        good, ok = rest[: (len(rest) + 1) // 2], rest[(len(rest) + 1) // 2 :]
        qid = f"{lm}_1"
        (gt / f"{qid}_query.txt").write_text(f"oxc1_{stem} {0.1 * w:.1f} {0.1 * h:.1f} {0.9 * w:.1f} {0.9 * h:.1f}\n")
        for kind, names in (("good", good), ("ok", ok), ("junk", junk)):
            (gt / f"{qid}_{kind}.txt").write_text("".join(n + "\n" for n in names))
    return root

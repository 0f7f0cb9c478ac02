"""Oxford5k / Paris6k (original ``gt/`` lists) and Revisited Oxford / Paris (``gnd_r*.pkl``)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hafloc.datasets.base import Dataset, Quirks
from hafloc.errors import InputError
from hafloc.images.io import image_files

_QUERY_PREFIX = re.compile(r"^oxc\d+_")


def image_dir(root: Path) -> Path:
    return root / "jpg" if (root / "jpg").is_dir() else root


def _index_images(folder: Path) -> dict[str, str]:
    """stem -> path relative to the folder's parent root; Paris ships per-landmark sub-folders."""
    out: dict[str, str] = {}
    for p in image_files(folder):
        out.setdefault(p.stem, p.relative_to(folder).as_posix())
    return out


def _readable(path: Path) -> bool:
    # Paris6k ships 20 corrupt files; a header read is enough to spot them and is cheap
    try:
        if path.stat().st_size == 0:
            return False
        with Image.open(path) as im:
            im.size
        return True
    except Exception:
        return False


def _read_names(path: Path) -> list[str]:
    try:
        return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read ({e.__class__.__name__})") from None


def is_oxford_layout(root: Path) -> bool:
    return (root / "gt").is_dir() and any((root / "gt").glob("*_query.txt"))


def load_oxford(
    path: str | Path, split: str = "test", queries: str = "full", check_images: bool = True, **_: Any
) -> Dataset:
    """Oxford5k / Paris6k as distributed: images in ``jpg/`` (any depth) and ``gt/<q>_{good,ok,junk,query}.txt``.

    Positives = good + ok, junk = junk (removed from the ranking), boxes from query.txt
    (``oxc1_<name> x1 y1 x2 y2``; Paris names lack the prefix) in ``quirks.crop_boxes``;
    ``queries='crop'`` sets ``quirks.crop_queries``. Unreadable database files (Paris's 20
    corrupt ones) are dropped and listed in ``quirks.dropped``.
    """
    root = Path(path)
    if queries not in ("full", "crop"):
        raise ValueError("queries must be 'full' or 'crop'")
    gt = root / "gt"
    qfiles = sorted(gt.glob("*_query.txt"))
    if not qfiles:
        raise InputError(gt, "no *_query.txt files")
    imdir = image_dir(root)
    stems = _index_images(imdir)
    if not stems:
        raise InputError(imdir, "no images")
    names = sorted(stems)
    dropped = [n for n in names if not _readable(imdir / stems[n])] if check_images else []
    drop = set(dropped)
    names = [n for n in names if n not in drop]
    index = {n: i for i, n in enumerate(names)}
    prefix = imdir.relative_to(root).as_posix()
    q_images, boxes, positives, junk, q_ids = [], [], [], [], []
    for qf in qfiles:
        qid = qf.name[: -len("_query.txt")]
        parts = qf.read_text().split()
        if len(parts) < 5:
            raise InputError(qf, "expected '<image> x1 y1 x2 y2'")
        qname = _QUERY_PREFIX.sub("", parts[0])
        if qname not in index:
            raise InputError(qf, f"query image {qname!r} not found under {imdir}")
        try:
            boxes.append([float(x) for x in parts[1:5]])
        except ValueError:
            raise InputError(qf, "box coordinates are not numbers") from None
        lists = {}
        for kind in ("good", "ok", "junk"):
            f = gt / f"{qid}_{kind}.txt"
            if not f.is_file():
                raise InputError(f, "missing ground-truth list")
            lists[kind] = [index[n] for n in _read_names(f) if n in index]
        q_ids.append(qid)
        q_images.append(f"{prefix}/{stems[qname]}" if prefix != "." else stems[qname])
        positives.append(np.array(sorted(set(lists["good"] + lists["ok"])), dtype=np.int64))
        junk.append(np.array(sorted(set(lists["junk"])), dtype=np.int64))
    db = [f"{prefix}/{stems[n]}" if prefix != "." else stems[n] for n in names]
    quirks = Quirks(
        crop_boxes=np.asarray(boxes),
        crop_queries=queries == "crop",
        dropped=dropped,
        query_ids=q_ids,
        protocol=f"original Oxford/Paris mAP ({queries} queries)",
    )
    name = (
        "paris6k"
        if any(
            q.startswith(
                (
                    "defense",
                    "eiffel",
                    "invalides",
                    "louvre",
                    "moulinrouge",
                    "museedorsay",
                    "notredame",
                    "pantheon",
                    "pompidou",
                    "sacrecoeur",
                    "triomphe",
                )
            )
            for q in q_ids
        )
        else ("oxford5k" if q_ids and q_ids[0].startswith(("all_souls", "ashmolean")) else root.name)
    )
    return Dataset(
        name=name,
        format="oxford",
        root=root,
        db_images=db,
        q_images=q_images,
        positives=positives,
        junk=junk,
        pos_threshold=0.0,
        metric="map",
        quirks=quirks,
    )


def find_revisited_pkl(path: Path) -> Path | None:
    if path.is_file():
        return path
    found = sorted(path.glob("gnd_r*.pkl"))
    return found[0] if len(found) == 1 else None


def load_revisited(path: str | Path, split: str = "test", **_: Any) -> Dataset:
    """Revisited Oxford / Paris: ``gnd_r{oxford5k,paris6k}.pkl`` with images in ``jpg/<name>.jpg``.

    Positives/junk are the Medium protocol; ``quirks.revisited`` holds easy/hard/junk for E/M/H.
    Queries are always cropped (``crop_boxes``, ``crop_queries=True``).
    """
    path = Path(path)
    pkl = find_revisited_pkl(path)
    if pkl is None:
        raise InputError(path, "expected exactly one gnd_r*.pkl")
    try:
        with open(pkl, "rb") as fh:
            cfg = pickle.load(fh)  # the published ground truth is a pickle; only open files you trust
    except Exception as e:
        raise InputError(pkl, f"not a readable pickle ({e.__class__.__name__})") from None
    for key in ("imlist", "qimlist", "gnd"):
        if not isinstance(cfg, dict) or key not in cfg:
            raise InputError(pkl, f"missing key '{key}'")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise InputError(pkl, f"{len(cfg['gnd'])} ground-truth entries for {len(cfg['qimlist'])} queries")
    root = pkl.parent
    imdir = image_dir(root)
    prefix = imdir.relative_to(root).as_posix()
    rel = (lambda n: f"{prefix}/{n}.jpg") if prefix != "." else (lambda n: f"{n}.jpg")
    easy, hard, junk, boxes = [], [], [], []
    for i, g in enumerate(cfg["gnd"]):
        try:
            easy.append(np.asarray(g["easy"], dtype=np.int64).ravel())
            hard.append(np.asarray(g["hard"], dtype=np.int64).ravel())
            junk.append(np.asarray(g["junk"], dtype=np.int64).ravel())
            boxes.append([float(x) for x in np.ravel(g["bbx"])[:4]])
        except (KeyError, TypeError, ValueError):
            raise InputError(pkl, f"query {i}: entry lacks easy/hard/junk/bbx") from None
    positives = [np.union1d(e, h) for e, h in zip(easy, hard)]
    name = pkl.stem.removeprefix("gnd_")
    return Dataset(
        name=name,
        format="revisited",
        root=root,
        db_images=[rel(n) for n in cfg["imlist"]],
        q_images=[rel(n) for n in cfg["qimlist"]],
        positives=positives,
        junk=junk,
        pos_threshold=0.0,
        metric="revisited",
        quirks=Quirks(
            revisited={"easy": easy, "hard": hard, "junk": junk},
            crop_boxes=np.asarray(boxes),
            crop_queries=True,
            protocol="revisited E/M/H",
        ),
    )

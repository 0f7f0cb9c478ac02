"""Pick the reader for a path (or use ``format=``) and load one split as a ``Dataset``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from hafloc.datasets.atfolders import is_at_layout, load_at_folders
from hafloc.datasets.base import Dataset
from hafloc.datasets.common import read_text
from hafloc.datasets.dbstruct import load_dbstruct
from hafloc.datasets.geotagged import find_position_csv, load_geotagged
from hafloc.datasets.gsvnpy import SUFFIXES as GSV_SUFFIXES, load_gsv_npy, prefixes as gsv_prefixes
from hafloc.datasets.holidays import is_holidays_layout, load_holidays
from hafloc.datasets.labels import is_label_csv, load_labels
from hafloc.datasets.oxford import find_revisited_pkl, is_oxford_layout, load_oxford, load_revisited
from hafloc.datasets.patchnetvlad import load_patchnetvlad
from hafloc.datasets.sf0 import is_sf0_layout, load_sf0
from hafloc.datasets.vprbench import load_vprbench
from hafloc.errors import InputError

Loader = Callable[..., Dataset]

# name -> (loader, one-line description); the CLI offers these as --format.
FORMATS: dict[str, tuple[Loader, str]] = {
    "at": (load_at_folders, "'@' folders: images/{train,val,test}/{database,queries}/@east@north@...@.jpg"),
    "dbstruct": (load_dbstruct, "NetVLAD dbStruct .mat (Pittsburgh, Tokyo 24/7, TokyoTM, variants)"),
    "patchnetvlad": (load_patchnetvlad, "Patch-NetVLAD .npz (utmQ, utmDb, posDistThr) + image-name lists"),
    "vprbench": (load_vprbench, "VPR-Bench folder: ground_truth_new.npy + query/ + ref/"),
    "gsv_npy": (load_gsv_npy, "gsv-cities style <name>_dbImages/_qImages/_gt.npy"),
    "oxford": (load_oxford, "Oxford5k / Paris6k: jpg/ + gt/*_{good,ok,junk,query}.txt"),
    "revisited": (load_revisited, "Revisited Oxford / Paris: gnd_r{oxford5k,paris6k}.pkl + jpg/"),
    "holidays": (load_holidays, "INRIA Holidays: NNNNNN.jpg images (in jpg/ or the folder)"),
    "sf0": (load_sf0, "SF-0 San Francisco: building-ID or posed-query (25 m) ground truth"),
    "labels": (load_labels, "label CSV (any name, found by its header): image,label,split"),
    "geotagged": (load_geotagged, "photos with EXIF GPS or a position CSV; database/ + queries/"),
}


def detect_format(path: str | Path) -> str:
    """The FORMATS name for a path, from its files (no image decoding)."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "not found")
    if p.is_file():
        name, suf = p.name, p.suffix.lower()
        if suf in (".mat", ".db"):
            return "dbstruct"
        if suf == ".npz":
            return "patchnetvlad"
        if suf == ".pkl" and name.startswith("gnd_r"):
            return "revisited"
        if name.startswith("ground_truth") and suf == ".npy":
            return "vprbench"
        if any(name.endswith(s) for s in GSV_SUFFIXES):
            return "gsv_npy"
        if suf == ".csv":
            read_text(p)  # an empty or non-UTF-8 file: say so, not "unknown layout"
            return "labels" if is_label_csv(p) else "geotagged"
        raise InputError(p, "unknown dataset file type (use --format)")
    if find_revisited_pkl(p) is not None:
        return "revisited"
    if is_oxford_layout(p):
        return "oxford"
    if is_sf0_layout(p):
        return "sf0"
    if is_at_layout(p):
        return "at"
    if (p / "ground_truth_new.npy").is_file():
        return "vprbench"
    if is_label_csv(p):
        return "labels"
    if gsv_prefixes(p):
        return "gsv_npy"
    mats = [f for d in (p, p / "datasets") if d.is_dir() for f in d.glob("*.mat")]
    if mats:
        return "dbstruct"
    if list(p.glob("*.npz")):
        return "patchnetvlad"
    if (
        find_position_csv(p) is not None
        or (p / "database").is_dir()
        or ((p / "database.csv").is_file() and (p / "query.csv").is_file())
    ):
        return "geotagged"
    if is_holidays_layout(p):
        return "holidays"
    for f in sorted(p.glob("*.csv")):  # a CSV we could not read may be the layout's key file: name its problem
        read_text(f)
    raise InputError(p, "cannot tell the dataset layout (use --format; known: " + ", ".join(FORMATS) + ")")


def _pick_file(p: Path, pattern: str, split: str) -> Path:
    """A folder of several dbStruct/npz files: the one whose name mentions the split."""
    files = sorted(f for d in (p, p / "datasets") if d.is_dir() for f in d.glob(pattern))
    if len(files) == 1:
        return files[0]
    tagged = [f for f in files if f"_{split}" in f.stem]
    if len(tagged) == 1:
        return tagged[0]
    raise InputError(p, f"{len(files)} {pattern} files here, {len(tagged)} for split '{split}'; pass the file")


def load_dataset(path: str | Path, format: str | None = None, split: str = "test", **options: Any) -> Dataset:
    """Load one split ('train' | 'val' | 'test') of the dataset at ``path``.

    ``format`` (a FORMATS key) overrides detection; ``options`` go to the reader (e.g.
    ``image_root=`` for ground-truth files kept apart from the images, ``queries='crop'`` for
    Oxford/Paris, ``val_fraction=``/``seed=`` for label sets without a val split).
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    p = Path(path)
    fmt = format or detect_format(p)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if p.is_dir() and fmt == "dbstruct":
        p = _pick_file(p, "*.mat", split)
    elif p.is_dir() and fmt == "patchnetvlad":
        p = _pick_file(p, "*.npz", split)
    return FORMATS[fmt][0](p, split=split, **options)

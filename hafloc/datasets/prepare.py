"""Converters of public street-view repositories into the '@' layout, with geographic splits.

``prepare(source_kind, source, output, seed)`` reads a repository (a plain checkout, or a bare git
directory as ``git clone --bare`` or a mirror leaves it) and writes
``OUTPUT/images/{train,val,test}/{database,queries}/@...@.jpg`` (the layout ``load_at_folders``
reads), copying each JPEG's bytes unchanged, plus ``OUTPUT/prepare.json`` (what was written, the
split, the protocol). Sources:

- ``cambridge-streetview`` (GreenSlime96/StreetView-Localisation): ``data/coordinates`` line i is
  ``lat,lon`` of location i; ``data/images/{i}_{h}.jpg``, h = 0..3 the headings N/E/S/W, h = 4 a
  view straight up (dropped). Queries (val, test): the views of every 3rd location of the split;
  database: the other locations. One capture, so no time filter.
- ``sf-night`` (AMLSquad/CosPlace at commit 6708db5, ``syntethic_night_augmentation/``): SF-XS
  views darkened to night, named ``night@EAST@NORTH@ZONE@LETTER@LAT@LON@PANO@...@YYYYMM@@.jpg``.
  Places are 15 m cells; queries (val, test): every image of one capture month (chosen by the
  seed) of each place seen in two or more months; database: the rest. A query is scored against database images
  of *other* capture months only (``protocol.json``: same month excluded, as TokyoTM's rule).

The train split is a database only (training uses each image as a query against the others).
The split is geographic: places are ordered along a direction (east for seed 0; other seeds turn
it), the first ~15 % become test, then a gap of ``gap_m`` (>= 50 m) whose places are dropped,
then ~15 % val, another gap, and the rest train. Identical image bytes are kept once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from ..errors import HaflocError, InputError
from ..fileio import atomic_path, write_json_atomic
from .atfolders import SPLITS, at_name, parse_at_name
from .geo import latlon_to_utm

log = logging.getLogger(__name__)

SOURCES = ("cambridge-streetview", "sf-night")
PROTOCOL_FILE = "protocol.json"
SF_NIGHT_REV = "6708db5"
SF_NIGHT_FOLDER = "syntethic_night_augmentation"


class SourceTree:
    """Files of a repository at one revision: a checkout's work tree, or the blobs of a git dir."""

    def __init__(self, root: str | Path, rev: str = "HEAD", subdir: str = ""):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(self.root, "source not found (give a clone of the repository or its git directory)")
        self.rev = rev
        git_dir = None
        if (self.root / "objects").is_dir() and (self.root / "HEAD").is_file():
            git_dir = self.root  # bare / mirror
        elif subdir and not (self.root / subdir).exists() and (self.root / ".git").exists():
            git_dir = self.root / ".git"  # a checkout at another commit: read the revision from its history
        self.git_dir = git_dir
        self._blobs: dict[str, str] = {}
        if git_dir is not None:
            self._blobs = self._ls_tree(subdir)

    def _git(self, *args: str, input: bytes | None = None) -> bytes:
        if shutil.which("git") is None:
            raise HaflocError("reading a git directory needs the 'git' command (or give a checkout instead)")
        try:
            return subprocess.run(
                ["git", f"--git-dir={self.git_dir}", *args], input=input, capture_output=True, check=True
            ).stdout
        except subprocess.CalledProcessError as err:
            msg = (err.stderr.decode(errors="replace").strip().splitlines() or ["failed"])[0]
            raise InputError(self.root, f"git {args[0]}: {msg}") from None

    def _ls_tree(self, subdir: str) -> dict[str, str]:
        out = self._git("ls-tree", "-r", "-z", self.rev, "--", subdir or ".")
        blobs = {}
        for entry in out.split(b"\0"):
            if not entry:
                continue
            meta, path = entry.split(b"\t", 1)
            kind, sha = meta.split()[1:3]
            if kind == b"blob":
                blobs[path.decode("utf-8", "surrogateescape")] = sha.decode()
        return blobs

    def files(self, subdir: str) -> list[str]:
        """Paths (relative to the repository root) of the files under ``subdir``."""
        if self.git_dir is not None:
            prefix = subdir.rstrip("/") + "/"
            return sorted(p for p in self._blobs if p.startswith(prefix))
        base = self.root / subdir
        if not base.is_dir():
            raise InputError(base, "folder not found in the source")
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def read(self, path: str) -> bytes:
        if self.git_dir is not None:
            if path not in self._blobs:
                raise InputError(self.root, f"{path} not found at revision {self.rev}")
            return self._git("cat-file", "blob", self._blobs[path])
        p = self.root / path
        if not p.is_file():
            raise InputError(p, "file not found in the source")
        return p.read_bytes()

    def read_many(self, paths: list[str]) -> Iterator[tuple[str, bytes]]:
        """(path, bytes) in order; one ``git cat-file --batch`` process for a git dir."""
        if self.git_dir is None:
            for p in paths:
                yield p, self.read(p)
            return
        missing = [p for p in paths if p not in self._blobs]
        if missing:
            raise InputError(self.root, f"{missing[0]} not found at revision {self.rev}")
        proc = subprocess.Popen(
            ["git", f"--git-dir={self.git_dir}", "cat-file", "--batch"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            for p in paths:
                proc.stdin.write((self._blobs[p] + "\n").encode())
                proc.stdin.flush()
                header = proc.stdout.readline().split()
                if len(header) < 3:
                    raise InputError(self.root, f"git cat-file could not read {p}")
                data = proc.stdout.read(int(header[2]))
                proc.stdout.read(1)  # the newline after each object
                yield p, data
        finally:
            proc.stdin.close()
            proc.wait()


@dataclass
class View:
    """One image of a source: where it goes and what its '@' name says."""

    path: str  # in the source
    place: int
    east: float
    north: float
    zone: int
    letter: str
    pano: str = ""
    heading: float | None = None
    timestamp: str = ""
    note: str = ""


def band_split(
    place_xy: np.ndarray, seed: int = 0, val: float = 0.15, test: float = 0.15, gap_m: float = 50.0
) -> np.ndarray:
    """'train' / 'val' / 'test' / '' (dropped in a gap) per place, by bands across the area.

    Places are ordered along a direction (east for seed 0; seed s turns it by s x 67.5 degrees);
    the first ``test`` fraction is test, then every place within ``gap_m`` of it is dropped, then
    ``val``, another gap, and the rest is train. Deterministic; each band is at least one place.
    """
    if gap_m < 0 or not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise ValueError("need 0 < val, test and val + test < 1, gap >= 0")
    n = len(place_xy)
    angle = math.radians((seed * 67.5) % 180.0)
    t = place_xy @ np.array([math.cos(angle), math.sin(angle)])
    order = np.argsort(t, kind="stable")
    out = np.full(n, "", dtype=object)
    start = 0
    for name, frac in (("test", test), ("val", val)):
        k = max(1, int(round(frac * n)))
        band = order[start : start + k]
        out[band] = name
        edge = t[band].max()
        start += k
        while start < n and t[order[start]] < edge + gap_m:
            start += 1  # the gap: neither this band nor the next
    out[order[start:]] = "train"
    return out


def _month_exclusion(split_dir: Path, source: str) -> None:
    write_json_atomic(
        split_dir / PROTOCOL_FILE,
        {
            "exclude_same": "timestamp",
            "description": f"{source}: right = database image within 25 m of the query, taken in another "
            "capture month (database images of the query's month are left out of its ranking)",
        },
    )


def read_cambridge(tree: SourceTree) -> list[View]:
    text = tree.read("data/coordinates").decode("utf-8", errors="replace")
    coords = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            lat, lon = (float(v) for v in line.split(",")[:2])
        except ValueError:
            raise InputError(tree.root / "data/coordinates", f"line {i}: not 'lat,lon': {line[:60]!r}") from None
        if not (math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180):
            raise InputError(tree.root / "data/coordinates", f"line {i}: position {lat},{lon} out of range")
        coords.append((lat, lon))
    if not coords:
        raise InputError(tree.root / "data/coordinates", "no positions")
    east, north, zone, letter = latlon_to_utm(np.array([c[0] for c in coords]), np.array([c[1] for c in coords]))
    views = []
    pattern = re.compile(r"^data/images/(\d+)_(\d)\.jpe?g$", re.IGNORECASE)
    for p in tree.files("data/images"):
        m = pattern.match(p)
        if not m:
            continue
        i, h = int(m.group(1)), int(m.group(2))
        if h > 3 or i >= len(coords):  # 4: the view straight up; a view without a coordinate line
            continue
        views.append(View(p, i, float(east[i]), float(north[i]), zone, letter, pano=f"loc{i}", heading=90.0 * h))
    return views


def read_sf_night(tree: SourceTree) -> list[View]:
    views = []
    for p in tree.files(SF_NIGHT_FOLDER):
        name = Path(p).name
        if not name.lower().endswith(".jpg") or "@" not in name or "/." in "/" + p:
            continue  # notebooks' checkpoint copies and other files
        try:
            f = parse_at_name(name[name.index("@") :])
        except ValueError:
            log.warning("%s: not an SF-XL '@' name, skipped", p)
            continue
        if f["zone"] is None or f["letter"] is None or not f["timestamp"]:
            log.warning("%s: no UTM zone or capture month in the name, skipped", p)
            continue
        views.append(
            View(
                p,
                -1,
                f["east"],
                f["north"],
                f["zone"],
                f["letter"],
                pano=f["pano"] or "",
                heading=f["heading"],
                timestamp=str(f["timestamp"]),
            )
        )
    # places: 15 m cells (CosPlace's M), numbered in order of appearance
    cells: dict[tuple[int, int], int] = {}
    for v in views:
        v.place = cells.setdefault((int(v.east // 15), int(v.north // 15)), len(cells))
    return views


READERS: dict[str, tuple[Callable[[SourceTree], list[View]], str, str]] = {
    # kind -> (reader, default revision, folder that must exist)
    "cambridge-streetview": (read_cambridge, "HEAD", "data"),
    "sf-night": (read_sf_night, SF_NIGHT_REV, SF_NIGHT_FOLDER),
}


def _queries(kind: str, views: list[View], split: np.ndarray, seed: int) -> np.ndarray:
    """Which views of the val and test splits are queries (per the source's protocol). The train
    split has a database only: training uses every image as a query against the rest."""
    is_q = np.zeros(len(views), dtype=bool)
    if kind == "cambridge-streetview":
        for s in ("val", "test"):
            places = sorted({v.place for v, sp in zip(views, split) if sp == s})
            qp = set(places[::3])
            is_q |= np.array([sp == s and v.place in qp for v, sp in zip(views, split)])
        return is_q
    rng = np.random.default_rng(seed)
    months: dict[int, list[str]] = {}
    for v in views:
        months.setdefault(v.place, [])
        if v.timestamp not in months[v.place]:
            months[v.place].append(v.timestamp)
    chosen = {p: sorted(ms)[int(rng.integers(len(ms)))] for p, ms in sorted(months.items()) if len(ms) >= 2}
    return np.array([chosen.get(v.place) == v.timestamp and sp != "train" for v, sp in zip(views, split)])


def _open_source(source: str | Path, rev: str | None, default_rev: str, folder: str) -> SourceTree:
    """The source at ``rev``; without one, the source's known revision when the history has it, else HEAD."""
    if rev:
        return SourceTree(source, rev, subdir=folder)
    try:
        return SourceTree(source, default_rev, subdir=folder)
    except InputError:
        if default_rev == "HEAD":
            raise
        return SourceTree(source, "HEAD", subdir=folder)


def prepare(
    kind: str,
    source: str | Path,
    output: str | Path,
    seed: int = 0,
    gap_m: float = 50.0,
    rev: str | None = None,
    progress: bool = True,
) -> dict:
    """Convert ``source`` into the '@' layout under ``output``; returns the summary (also in prepare.json).

    Rerunning with the same settings skips files already written (each is written atomically).
    """
    if kind not in READERS:
        raise HaflocError(f"unknown source {kind!r}; choose from {', '.join(SOURCES)}")
    if gap_m < 50:
        raise HaflocError(f"--gap {gap_m:g} m: the split needs bands at least 50 m apart")
    reader, default_rev, folder = READERS[kind]
    tree = _open_source(source, rev, default_rev, folder)
    views = reader(tree)
    if not views:
        raise InputError(tree.root, f"no {kind} images found (is this the right repository and revision?)")
    out = Path(output)
    summary_path = out / "prepare.json"
    # places: their mean position
    place_ids = sorted({v.place for v in views})
    pos: dict[int, list[tuple[float, float]]] = {p: [] for p in place_ids}
    for v in views:
        pos[v.place].append((v.east, v.north))
    xy = np.array([np.mean(pos[p], axis=0) for p in place_ids])
    place_split = dict(zip(place_ids, band_split(xy, seed=seed, gap_m=gap_m)))
    split = np.array([place_split[v.place] for v in views], dtype=object)
    is_q = _queries(kind, views, split, seed)
    counts = {s: {"database": 0, "queries": 0} for s in SPLITS}
    duplicates, dropped_gap = 0, int(np.sum(split == ""))
    seen: set[str] = set()
    keep = [i for i in range(len(views)) if split[i]]
    bar = tqdm(total=len(keep), desc=f"prepare {kind}", unit="img", disable=not progress, dynamic_ncols=True)
    for i, (path, data) in zip(keep, tree.read_many([views[i].path for i in keep])):
        bar.update(1)
        digest = hashlib.sha1(data).hexdigest()
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        if not data[:3] == b"\xff\xd8\xff":
            log.warning("%s: not a JPEG, skipped", path)
            continue
        v = views[i]
        side = "queries" if is_q[i] else "database"
        name = at_name(
            v.east, v.north, v.zone, v.letter, pano=v.pano, heading=v.heading, timestamp=v.timestamp, note=v.note
        )
        dest = out / "images" / split[i] / side / name
        counts[split[i]][side] += 1
        if dest.is_file() and dest.stat().st_size == len(data):
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            tmp.write_bytes(data)
    bar.close()
    if kind == "sf-night":
        for s in SPLITS:
            _month_exclusion(out / "images" / s, kind)
    summary = {
        "source": kind,
        "repository": str(tree.root),
        "revision": tree.rev if tree.git_dir is not None else "work tree",
        "seed": seed,
        "gap_m": gap_m,
        "places": {s: int(sum(1 for p in place_ids if place_split[p] == s)) for s in SPLITS},
        "places_dropped_in_gaps": int(sum(1 for p in place_ids if place_split[p] == "")),
        "images": counts,
        "images_dropped_in_gaps": dropped_gap,
        "duplicates_dropped": duplicates,
        "protocol": "right = database image within 25 m"
        + (" of another capture month" if kind == "sf-night" else "")
        + "; train: database only (each image a training query); val/test queries: "
        + (
            "every view of every 3rd location of the split"
            if kind == "cambridge-streetview"
            else "all images of one capture month of each 15 m place seen in 2+ months"
        ),
    }
    write_json_atomic(summary_path, summary)
    return summary

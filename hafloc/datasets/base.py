"""The one Dataset abstraction every reader returns and every scorer/trainer consumes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hafloc.errors import InputError

METRICS = ("recall", "map", "revisited", "holidays")

_DB, _Q, _PAIRED = {"per": "db"}, {"per": "q"}, {"per": "paired"}


@dataclass
class Quirks:
    """What a dataset's format adds to the plain database/query lists (every field optional).

    Fields marked per database image / per query hold one entry per image: ``Dataset.subset``
    indexes them; paired ones are ``{"db": per-db array, "q": per-query array}``.
    """

    protocol: str | None = None  # free text naming the ground truth used (e.g. SF-0 variant)
    # per database image
    tokyo_nms: np.ndarray | None = field(default=None, metadata=_DB)  # panorama id -> Tokyo 24/7 spatial NMS
    db_notes: list[str] | None = field(default=None, metadata=_DB)  # the '@' note field
    db_building_ids: list[Any] | None = field(default=None, metadata=_DB)
    # per query
    crop_boxes: np.ndarray | None = field(default=None, metadata=_Q)  # (Nq, 4) x1 y1 x2 y2 (Oxford/Paris)
    q_notes: list[str] | None = field(default=None, metadata=_Q)
    q_building_ids: list[Any] | None = field(default=None, metadata=_Q)  # SF-0 building ids
    q_conditions: list[str] | None = field(default=None, metadata=_Q)  # Tokyo 24/7 day/sunset/night
    # per database image and per query
    timestamps: dict[str, Any] | None = field(default=None, metadata=_PAIRED)  # TokyoTM same-time exclusion
    latlon: dict[str, Any] | None = field(default=None, metadata=_PAIRED)  # (N, 2) degrees, geotagged photos
    sources: dict[str, Any] | None = field(default=None, metadata=_PAIRED)  # source index per image (combine)
    capture_times: dict[str, Any] | None = field(default=None, metadata=_PAIRED)  # the '@' timestamp field
    # {"easy", "hard", "junk": per-query db-index arrays} of the revisited Oxford/Paris protocol
    revisited: dict[str, list[np.ndarray]] | None = None
    # how to load and score
    crop_queries: bool = False  # extract queries cropped to their box
    max_size: tuple[int, int] | None = None  # (w, h) downscale bound (Holidays: 1024x768)
    apply_exif_orientation: bool = True  # INRIA Holidays "orig" must not
    q_db_index: np.ndarray | None = None  # Holidays: each query's own database index
    query_ids: list[str] | None = None  # Oxford/Paris query names
    # how the files were read (reported, not used for scoring)
    northing_first: bool = False
    index_coordinates: bool = False  # positions are frame indices along a track, not metres
    non_trivial_pos_dist_sq_thr: float | None = None
    which_set: str | None = None
    mixed_utm_zones: list[str] | None = None
    true_negative_queries: int | None = None  # queries without any positive (VPR-Bench)
    images_missing: bool = False
    dropped: list[str] | None = None  # unreadable database files left out
    skipped: list[str] | None = None  # images without a position left out
    position_source: str | None = None
    split_from_database: dict[str, Any] | None = None  # see split_database
    source_names: list[str] | None = None  # names of the sets a combined dataset was made of

    def per(self, kind: str) -> list[str]:
        """Names of the fields held per image of ``kind`` ("db", "q" or "paired")."""
        return [f.name for f in dataclasses.fields(self) if f.metadata.get("per") == kind]


def check_positions(src: str | Path, names: Sequence[str], utm: np.ndarray | None, side: str) -> None:
    """InputError naming ``src``, the first image whose position is not finite and how many are.

    Readers call it with the file the positions came from, before any extraction; ``Dataset``
    calls it too (with its root) so no reader can hand a NaN to the scorer."""
    if utm is None or len(utm) == 0:
        return
    bad = np.flatnonzero(~np.isfinite(np.asarray(utm, dtype=np.float64)).all(axis=1))
    if len(bad):
        i = int(bad[0])
        name = names[i] if i < len(names) else f"#{i}"
        raise InputError(
            src,
            f"{side} image {name!r} (#{i + 1}) has position {tuple(float(v) for v in utm[i])}, "
            f"not finite ({len(bad)} of {len(utm)} {side} positions are bad)",
        )


@dataclass
class Dataset:
    """Database + query images with the ground truth needed to score retrieval.

    Ground truth comes from (first match wins in ``query_positives``): explicit ``positives``
    (index lists from the file), UTM positions (radius ``pos_threshold`` metres), or labels
    (same label = same place). ``junk`` lists database indices removed from a query's ranking.

    ``quirks``: what the format adds (crop boxes, Tokyo panoramas, timestamps...): :class:`Quirks`.
    """

    name: str
    format: str
    root: Path
    db_images: list[str]
    q_images: list[str]
    db_utm: np.ndarray | None = None
    q_utm: np.ndarray | None = None
    db_labels: np.ndarray | None = None
    q_labels: np.ndarray | None = None
    pos_threshold: float = 25.0
    positives: list[np.ndarray] | None = None
    junk: list[np.ndarray] | None = None
    metric: str = "recall"
    quirks: Quirks = field(default_factory=Quirks)
    utm_zone: tuple[int, str] | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.db_images = [str(x) for x in self.db_images]
        self.q_images = [str(x) for x in self.q_images]
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.metric == "revisited" and self.quirks.revisited is None:
            raise ValueError("metric 'revisited' needs quirks.revisited (easy/hard/junk lists)")
        for arr_name, n in (("db_utm", self.num_db), ("q_utm", self.num_q)):
            arr = getattr(self, arr_name)
            if arr is not None:
                arr = np.asarray(arr, dtype=np.float64).reshape(-1, 2)
                if len(arr) != n:
                    raise ValueError(f"{arr_name} has {len(arr)} rows for {n} images")
                check_positions(
                    self.root,
                    self.db_images if arr_name == "db_utm" else self.q_images,
                    arr,
                    "database" if arr_name == "db_utm" else "query",
                )
                setattr(self, arr_name, arr)
        for lab_name, n in (("db_labels", self.num_db), ("q_labels", self.num_q)):
            lab = getattr(self, lab_name)
            if lab is not None:
                lab = np.asarray(lab)
                if len(lab) != n:
                    raise ValueError(f"{lab_name} has {len(lab)} entries for {n} images")
                setattr(self, lab_name, lab)
        for lists_name in ("positives", "junk"):
            lists = getattr(self, lists_name)
            if lists is not None:
                if len(lists) != self.num_q:
                    raise ValueError(f"{lists_name} has {len(lists)} entries for {self.num_q} queries")
                setattr(self, lists_name, [np.asarray(p, dtype=np.int64).ravel() for p in lists])

    @property
    def num_db(self) -> int:
        return len(self.db_images)

    @property
    def num_q(self) -> int:
        return len(self.q_images)

    def _abs(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.root / p

    def db_paths(self) -> list[Path]:
        """Absolute paths of the database images."""
        return [self._abs(x) for x in self.db_images]

    def q_paths(self) -> list[Path]:
        """Absolute paths of the query images."""
        return [self._abs(x) for x in self.q_images]

    def has_ground_truth(self) -> bool:
        return (
            self.positives is not None
            or (self.db_utm is not None and self.q_utm is not None)
            or (self.db_labels is not None and self.q_labels is not None)
        )

    def query_positives(self, threshold: float | None = None) -> list[np.ndarray]:
        """Sorted database indices that count as correct for each query.

        Explicit lists from the file win unless a ``threshold`` (metres) is asked for and
        positions exist; then a radius search (distance <= threshold, as in NetVLAD's
        rangesearch) in UTM; then same-label images.
        """
        if self.positives is not None and (threshold is None or self.db_utm is None or self.q_utm is None):
            return [np.sort(p) for p in self.positives]
        if self.db_utm is not None and self.q_utm is not None:
            from scipy.spatial import cKDTree

            r = float(self.pos_threshold if threshold is None else threshold)
            if self.num_db == 0:
                return [np.zeros(0, np.int64) for _ in range(self.num_q)]
            hits = cKDTree(self.db_utm).query_ball_point(self.q_utm, r=r)
            return [np.sort(np.asarray(h, dtype=np.int64)) for h in hits]
        if self.db_labels is not None and self.q_labels is not None:
            by_label: dict[Any, list[int]] = {}
            for i, lab in enumerate(self.db_labels.tolist()):
                by_label.setdefault(lab, []).append(i)
            return [np.asarray(by_label.get(lab, []), dtype=np.int64) for lab in self.q_labels.tolist()]
        raise ValueError(f"dataset {self.name!r} has no ground truth (no positives, positions or labels)")

    def subset(
        self,
        db_idx: Sequence[int] | np.ndarray | None = None,
        q_idx: Sequence[int] | np.ndarray | None = None,
        name: str | None = None,
    ) -> "Dataset":
        """A dataset restricted to the given database / query indices (None keeps all).

        Explicit positive/junk lists are re-indexed into the new database order; entries whose
        database image was dropped disappear.
        """
        db_idx = np.arange(self.num_db) if db_idx is None else np.asarray(db_idx, dtype=np.int64).ravel()
        q_idx = np.arange(self.num_q) if q_idx is None else np.asarray(q_idx, dtype=np.int64).ravel()
        remap = np.full(self.num_db, -1, dtype=np.int64)
        remap[db_idx] = np.arange(len(db_idx))

        def relist(lists: list[np.ndarray] | None) -> list[np.ndarray] | None:
            if lists is None:
                return None
            out = []
            for qi in q_idx:
                m = remap[lists[qi]]
                out.append(np.sort(m[m >= 0]))
            return out

        def take(arr: Any, idx: np.ndarray) -> Any:
            if arr is None:
                return None
            if isinstance(arr, np.ndarray):
                return arr[idx]
            return [arr[i] for i in idx]

        quirks = dataclasses.replace(self.quirks)
        for k in quirks.per("db"):
            setattr(quirks, k, take(getattr(quirks, k), db_idx))
        for k in quirks.per("q"):
            setattr(quirks, k, take(getattr(quirks, k), q_idx))
        for k in quirks.per("paired"):
            pair = getattr(quirks, k)
            if pair is not None:
                setattr(quirks, k, {"db": take(pair["db"], db_idx), "q": take(pair["q"], q_idx)})
        if quirks.revisited is not None:
            quirks.revisited = {k: relist(v) or [] for k, v in quirks.revisited.items()}
        return dataclasses.replace(
            self,
            name=name or self.name,
            db_images=take(self.db_images, db_idx),
            q_images=take(self.q_images, q_idx),
            db_utm=take(self.db_utm, db_idx),
            q_utm=take(self.q_utm, q_idx),
            db_labels=take(self.db_labels, db_idx),
            q_labels=take(self.q_labels, q_idx),
            positives=relist(self.positives),
            junk=relist(self.junk),
            quirks=quirks,
        )

    def summary(self) -> dict[str, Any]:
        """A small JSON-able description (for config.json and reports)."""
        gt = (
            "positives"
            if self.positives is not None
            else "utm"
            if self.db_utm is not None
            else "labels"
            if self.db_labels is not None
            else "none"
        )
        return {
            "name": self.name,
            "format": self.format,
            "root": str(self.root),
            "num_db": self.num_db,
            "num_q": self.num_q,
            "metric": self.metric,
            "ground_truth": gt,
            "pos_threshold": self.pos_threshold,
            "protocol": self.quirks.protocol,
        }


def split_database(ds: Dataset, val_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split a dataset's database into (train, val) for sets that ship only gallery + queries.

    A ``val_fraction`` of the database images is held out and becomes the val *queries*; the
    remaining images form both the train database and the val database (the "map" is known,
    the val queries are unseen views of it - the deployment situation). Label sets are split
    per label (stratified: each label with >= 2 images keeps >= 1 image in the map and gives
    about ``val_fraction`` of its images, at least one, as queries), so every val query has a
    positive. Position sets hold out a random ``val_fraction``. The original queries are not
    used (they stay the test set). ``train.q_images`` is empty. Deterministic for a seed.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    if ds.positives is not None and ds.db_utm is None and ds.db_labels is None:
        raise ValueError(f"{ds.name}: cannot split a database whose ground truth is per-query index lists")
    rng = np.random.default_rng(seed)
    held: list[int] = []
    if ds.db_labels is not None:
        labels = ds.db_labels.tolist()
        groups: dict[Any, list[int]] = {}
        for i, lab in enumerate(labels):
            groups.setdefault(lab, []).append(i)
        for lab in sorted(groups, key=str):
            idx = np.array(groups[lab])
            if len(idx) < 2:
                continue
            rng.shuffle(idx)
            k = min(len(idx) - 1, max(1, int(round(val_fraction * len(idx)))))
            held.extend(idx[:k].tolist())
    elif ds.db_utm is not None:
        perm = rng.permutation(ds.num_db)
        held = perm[: max(1, int(round(val_fraction * ds.num_db)))].tolist()
    else:
        raise ValueError(f"{ds.name}: no labels or positions to split on")
    held_arr = np.array(sorted(held), dtype=np.int64)
    keep = np.setdiff1d(np.arange(ds.num_db), held_arr)
    no_queries = dataclasses.replace(ds.quirks, revisited=None)
    for name in no_queries.per("q") + no_queries.per("paired"):
        setattr(no_queries, name, None)
    base = dataclasses.replace(ds, positives=None, junk=None, q_images=[], q_utm=None, q_labels=None, quirks=no_queries)
    train = base.subset(db_idx=keep, name=f"{ds.name}-train")
    # the held-out images query by what the set has: labels, else positions (checked above)
    q_labels = ds.db_labels[held_arr] if ds.db_labels is not None else None
    q_utm = ds.db_utm[held_arr] if q_labels is None and ds.db_utm is not None else None
    val = dataclasses.replace(
        train, name=f"{ds.name}-val", q_images=[ds.db_images[i] for i in held_arr], q_labels=q_labels, q_utm=q_utm
    )
    val.quirks = dataclasses.replace(
        val.quirks,
        split_from_database={"val_fraction": val_fraction, "seed": seed, "val_query_db_indices": held_arr.tolist()},
    )
    train.quirks = dataclasses.replace(train.quirks, split_from_database={"val_fraction": val_fraction, "seed": seed})
    return train, val


# UTM offset between combined sets: no image of one set is ever within a radius of another's
_SOURCE_OFFSET_M = 1.0e8


def combine(datasets: Sequence[Dataset], name: str | None = None) -> Dataset:
    """One dataset made of several (same supervision): images by absolute path, positions kept
    apart by a large offset per set (no cross-set positive), timestamps kept where a set has them,
    and ``quirks.sources`` / ``source_names`` saying which set each image came from."""
    if len(datasets) == 1:
        return datasets[0]
    kinds = {("utm" if d.db_utm is not None else "labels" if d.db_labels is not None else "none") for d in datasets}
    if len(kinds) != 1 or "none" in kinds:
        raise ValueError("combined datasets must all have positions or all have labels")
    utm = kinds == {"utm"}

    def cat(parts: list[Any]) -> Any:
        return np.concatenate(parts) if parts else None

    db_images, q_images, db_utm, q_utm, db_lab, q_lab, db_src, q_src = [], [], [], [], [], [], [], []
    db_ts, q_ts = [], []
    any_ts = any(d.quirks.timestamps is not None for d in datasets)
    for i, d in enumerate(datasets):
        db_images += [str(p.resolve()) for p in d.db_paths()]
        q_images += [str(p.resolve()) for p in d.q_paths()]
        db_src.append(np.full(d.num_db, i))
        q_src.append(np.full(d.num_q, i))
        if utm:
            off = np.array([i * _SOURCE_OFFSET_M, 0.0])
            db_utm.append(np.asarray(d.db_utm) + off)
            q_utm.append(np.asarray(d.q_utm).reshape(-1, 2) + off if d.q_utm is not None else np.zeros((0, 2)))
        else:
            db_lab.append(np.array([f"{i}:{x}" for x in np.asarray(d.db_labels).tolist()]))
            q_lab.append(np.array([f"{i}:{x}" for x in (d.q_labels.tolist() if d.q_labels is not None else [])]))
        if any_ts:
            ts = d.quirks.timestamps
            db_ts.append(
                np.array([f"{i}:{x}" for x in ts["db"]]) if ts else np.array([f"{i}:d{j}" for j in range(d.num_db)])
            )
            q_ts.append(
                np.array([f"{i}:{x}" for x in ts["q"]]) if ts else np.array([f"{i}:q{j}" for j in range(d.num_q)])
            )
    quirks = Quirks(
        sources={"db": cat(db_src), "q": cat(q_src)},
        source_names=[d.name for d in datasets],
        timestamps={"db": cat(db_ts), "q": cat(q_ts)} if any_ts else None,
        protocol="; ".join(f"{d.name}: {d.quirks.protocol}" for d in datasets if d.quirks.protocol) or None,
    )
    return Dataset(
        name=name or "+".join(d.name for d in datasets),
        format="combined",
        root=Path("/"),
        db_images=db_images,
        q_images=q_images,
        db_utm=cat(db_utm) if utm else None,
        q_utm=cat(q_utm) if utm else None,
        db_labels=cat(db_lab) if not utm else None,
        q_labels=cat(q_lab) if not utm else None,
        pos_threshold=max(d.pos_threshold for d in datasets),
        quirks=quirks,
    )


def source_subsets(ds: Dataset) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, database indices, query indices) of each set a combined dataset was made of
    (one entry covering everything for a plain dataset)."""
    src, names = ds.quirks.sources, ds.quirks.source_names
    if src is None or not names:
        return [(ds.name, np.arange(ds.num_db), np.arange(ds.num_q))]
    db, q = np.asarray(src["db"]), np.asarray(src["q"])
    return [(n, np.flatnonzero(db == i), np.flatnonzero(q == i)) for i, n in enumerate(names)]

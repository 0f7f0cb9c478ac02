"""Training data: the train/val Datasets, their images at one fixed size, and the supervision.

Images are decoded once per use through a small thread pool, or kept in memory as uint8 when the
set is small (the decode is the dominant CPU cost of a frozen-trunk training step).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..datasets.base import Dataset, combine
from ..datasets.detect import load_dataset
from ..errors import HaflocError, InputError
from ..images.io import load_image, to_tensor
from .config import TrainConfig
from .mining import gps_candidates, label_candidates

log = logging.getLogger(__name__)


class ImageStore:
    """Images by index into ``paths``, as float (3, H, W) tensors in [0, 1] at ``size``."""

    def __init__(self, paths: list[Path], size: tuple[int, int], cache: bool, workers: int = 2):
        self.paths = list(paths)
        h, w = size
        self.size = (h, w)
        self.cache_enabled = cache
        self._cache: dict[int, torch.Tensor] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers))

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as a float (3, H, W) tensor in [0, 1] (from the cache when kept)."""
        t = self._cache.get(i)
        if t is not None:
            return t.float().div_(255.0)
        x = to_tensor(load_image(self.paths[i]), size=self.size)
        if self.cache_enabled:
            # to_tensor is uint8 / 255, so *255 + round restores the bytes exactly
            self._cache[i] = x.mul(255.0).round_().to(torch.uint8)
        return x

    def batch(self, ids: list[int] | np.ndarray) -> torch.Tensor:
        """(n, 3, H, W) for the given indices (decoded in parallel)."""
        ids = [int(i) for i in ids]
        return torch.stack(list(self._pool.map(self.load, ids))) if ids else torch.zeros(0, 3, *self.size)

    def check(self, ids: list[int], progress: bool = True) -> dict[int, str]:
        """Decode every image once (filling the cache); returns {index: reason} for unreadable ones."""
        bad: dict[int, str] = {}

        def try_load(i: int) -> str | None:
            try:
                self.load(i)
            except InputError as err:
                return err.cause
            return None

        for i, reason in zip(
            ids,
            tqdm(
                self._pool.map(try_load, ids),
                total=len(ids),
                desc="train: read images",
                unit="img",
                disable=not progress,
                dynamic_ncols=True,
            ),
        ):
            if reason is not None:
                bad[i] = reason
                log.warning("skipped %s: %s", self.paths[i], reason)
        return bad

    def drop_cache(self) -> None:
        """Forget the decoded images (the trunk cache holds what training needs of them)."""
        self.cache_enabled = False
        self._cache.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=False)


@dataclass
class TrainData:
    """Train/val datasets mapped onto one ImageStore, plus the training supervision.

    ``db_ids``/``q_ids``: store indices of the train database and training queries;
    ``self_queries``: the queries are the database itself (each excluded from its own positives).
    ``positives``/``non_negatives``: per training query, indices into the train database.
    """

    train: Dataset
    val: Dataset
    store: ImageStore
    db_ids: np.ndarray
    q_ids: np.ndarray
    self_queries: bool
    supervision: str
    positives: list[np.ndarray]
    non_negatives: list[np.ndarray]
    val_db_ids: np.ndarray
    val_q_ids: np.ndarray
    skipped: dict[str, str]


def pick_supervision(ds: Dataset, wanted: str) -> str:
    """'gps' when the training set has positions, else 'labels'; an explicit choice must be possible."""
    has_gps = ds.db_utm is not None and (ds.num_q == 0 or ds.q_utm is not None)
    has_labels = ds.db_labels is not None and (ds.num_q == 0 or ds.q_labels is not None)
    if wanted == "auto":
        if has_gps:
            return "gps"
        if has_labels:
            return "labels"
        raise HaflocError(f"{ds.name}: training needs positions or labels; this set has neither")
    if wanted == "gps" and not has_gps:
        raise HaflocError(f"{ds.name}: --supervision gps needs UTM positions, which this set lacks")
    if wanted == "labels" and not has_labels:
        raise HaflocError(f"{ds.name}: --supervision labels needs place labels, which this set lacks")
    return wanted


def supervision_lists(ds: Dataset, kind: str, cfg: TrainConfig) -> tuple[list[np.ndarray], list[np.ndarray], bool]:
    """(potential positives, non-negatives, self_queries) of the training queries.

    A set without separate training queries uses every database image as a query against the
    rest of the database: its own index leaves its positives (it stays a non-negative).
    """
    self_q = ds.num_q == 0
    if kind == "gps":
        q_utm = ds.db_utm if self_q else ds.q_utm
        if ds.db_utm is None or q_utm is None:
            raise HaflocError(f"{ds.name}: GPS supervision needs the position of every image")
        pos, nonneg = gps_candidates(ds.db_utm, q_utm, cfg.pos_radius, cfg.neg_radius)
    else:
        q_lab = ds.db_labels if self_q else ds.q_labels
        if ds.db_labels is None or q_lab is None:
            raise HaflocError(f"{ds.name}: label supervision needs the label of every image")
        pos, nonneg = label_candidates(ds.db_labels, q_lab)
    if self_q:
        pos = [p[p != i] for i, p in enumerate(pos)]
        nonneg = [np.union1d(n, [i]).astype(np.int64) for i, n in enumerate(nonneg)]
    return pos, nonneg, self_q


def dataset_paths(spec: str) -> list[str]:
    """The dataset folders of ``--dataset`` (several, comma-separated, train together)."""
    paths = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not paths:
        raise HaflocError("no dataset given")
    return paths


def load_train_data(cfg: TrainConfig, progress: bool = True) -> TrainData:
    """Load the train and val splits, read every image once, and build the supervision."""
    opts = {"val_fraction": cfg.val_fraction, "seed": cfg.seed}
    sources = dataset_paths(cfg.dataset)
    train = combine([load_dataset(p, cfg.format, split="train", **opts) for p in sources])
    val = combine([load_dataset(p, cfg.format, split="val", **opts) for p in sources])
    if train.num_db < 2:
        raise HaflocError(f"{train.name}: {train.num_db} training image(s); need at least 2")
    if val.num_q == 0 or val.num_db == 0:
        raise HaflocError(f"{val.name}: the validation split has no queries or no database")
    if cfg.max_val_queries and val.num_q > cfg.max_val_queries:
        picked = np.sort(np.random.default_rng(cfg.seed).choice(val.num_q, cfg.max_val_queries, replace=False))
        val = val.subset(q_idx=picked)

    index: dict[str, int] = {}
    paths: list[Path] = []

    def ids_of(ps: list[Path]) -> np.ndarray:
        out = []
        for p in ps:
            key = str(Path(p).resolve())
            if key not in index:
                index[key] = len(paths)
                paths.append(Path(p))
            out.append(index[key])
        return np.asarray(out, dtype=np.int64)

    groups = [ids_of(train.db_paths()), ids_of(train.q_paths()), ids_of(val.db_paths()), ids_of(val.q_paths())]
    h, w = cfg.image_size
    cache = cfg.cache_images == "yes" or (
        cfg.cache_images == "auto" and len(paths) * h * w <= cfg.cache_limit * 224 * 320
    )
    store = ImageStore(paths, cfg.image_size, cache=cache, workers=cfg.workers)
    bad = store.check(list(range(len(paths))), progress=progress)
    skipped = {str(paths[i]): r for i, r in bad.items()}
    if bad:
        bad_set = set(bad)

        def keep(ids: np.ndarray) -> np.ndarray:
            return np.flatnonzero([int(i) not in bad_set for i in ids])

        train = train.subset(db_idx=keep(groups[0]), q_idx=keep(groups[1]))
        val = val.subset(db_idx=keep(groups[2]), q_idx=keep(groups[3]))
        groups = [g[keep(g)] for g in groups]
        log.warning("%d unreadable image(s) left out of training/validation", len(bad))
    kind = pick_supervision(train, cfg.supervision)
    pos, nonneg, self_q = supervision_lists(train, kind, cfg)
    return TrainData(
        train=train,
        val=val,
        store=store,
        db_ids=groups[0],
        q_ids=groups[0] if self_q else groups[1],
        self_queries=self_q,
        supervision=kind,
        positives=pos,
        non_negatives=nonneg,
        val_db_ids=groups[2],
        val_q_ids=groups[3],
        skipped=skipped,
    )

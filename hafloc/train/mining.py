"""Weakly supervised tuple mining (NetVLAD style) on cached global descriptors.

Supervision gives, per training query, its *potential positives* (GPS: database images within
10 m; labels: same label) and its *non-negatives* (GPS: within 25 m; labels: same label);
every other database image is a negative. The miner then picks, per query and round:
- the positive: the potential positive nearest to the query in descriptor space;
- the negatives: the hardest (nearest in descriptor space) of a fresh random pool of
  ``pool_size`` negatives united with this query's cached hardest negatives of the previous
  round (NetVLAD's trick, which keeps hard negatives from being lost to sampling).

Descriptor distances are Euclidean on the descriptors the caller passes (for HAF the cached
global descriptor, not dD: dD needs per-cluster residuals nobody caches for a whole database).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["HardNegativeMiner", "gps_candidates", "label_candidates"]


def _as_points(utm: np.ndarray, name: str) -> np.ndarray:
    pts = np.asarray(utm, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{name} must be (N, 2) easting/northing, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{name} has non-finite coordinates")
    return pts


def gps_candidates(
    db_utm: np.ndarray,
    q_utm: np.ndarray,
    pos_radius: float = 10.0,
    neg_radius: float = 25.0,
    exclude_trivial_sq: float | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Potential positives and non-negatives of each query from UTM positions (metres).

    Args:
        db_utm: (Ndb, 2) database easting/northing; q_utm: (Nq, 2) queries.
        pos_radius: potential positives lie within this distance (inclusive; NetVLAD: 10 m).
        neg_radius: images within it (inclusive) are never negatives (NetVLAD: 25 m).
        exclude_trivial_sq: if set, potential positives at squared distance <= this are dropped
            (NetVLAD's MATLAB code drops dSq <= 1 m^2 as "trivial", e.g. the query's own
            panorama when queries come from the database). They stay non-negatives.

    Returns:
        (potential_positives, non_negatives): per query, sorted int64 database indices.
    """
    db = _as_points(db_utm, "db_utm")
    q = _as_points(q_utm, "q_utm")
    if not 0 <= pos_radius <= neg_radius:
        raise ValueError(f"need 0 <= pos_radius ({pos_radius}) <= neg_radius ({neg_radius})")
    tree = cKDTree(db)
    near = tree.query_ball_point(q, r=neg_radius)
    positives: list[np.ndarray] = []
    non_negatives: list[np.ndarray] = []
    pos_sq = pos_radius**2
    for i, idx in enumerate(near):
        idx = np.asarray(sorted(idx), dtype=np.int64)
        d_sq = ((db[idx] - q[i]) ** 2).sum(axis=1)
        keep = d_sq <= pos_sq
        if exclude_trivial_sq is not None:
            keep &= d_sq > exclude_trivial_sq
        positives.append(idx[keep])
        non_negatives.append(idx)
    return positives, non_negatives


def label_candidates(
    db_labels: Sequence[Any] | np.ndarray, q_labels: Sequence[Any] | np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Label supervision: potential positives = non-negatives = database images with the query's label.

    Labels compare as strings (1 and "1" are the same place). Returns the same structure as
    :func:`gps_candidates` (the two lists hold equal arrays).
    """
    db_arr = np.asarray([str(x) for x in db_labels])
    groups: dict[str, np.ndarray] = {}
    if len(db_arr):
        uniq, inverse = np.unique(db_arr, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1]
        for lab, members in zip(uniq, np.split(order, bounds)):
            groups[str(lab)] = members.astype(np.int64)
    empty = np.zeros(0, dtype=np.int64)
    positives = [groups.get(str(lab), empty) for lab in q_labels]
    return positives, [p.copy() for p in positives]


class HardNegativeMiner:
    """Per-query hard-negative mining with a per-query cache of last round's hardest negatives.

    Rule for the returned negatives (documented choice): candidates = (random pool of
    ``pool_size`` negatives, drawn without replacement) U (this query's cached negatives);
    sorted by descriptor distance to the query (ties by index); the ``num_negatives`` nearest
    are returned, and the ``cache_size`` nearest are cached for the next round (as NetVLAD's
    MATLAB code caches the nearest candidates, violating or not).
    With ``violating_only=True`` only negatives that violate the margin in descriptor space
    are returned: d(q, n) < d(q, p) + margin, with squared distances and margin 0.1 as in
    NetVLAD (``squared=False``: plain distances, pytorch-NetVLAD's margin**0.5 then is the
    caller's business); a query with none violating then gets an empty array, which NetVLAD
    skips for that round. The default returns a fixed-size tuple: the violating negatives are
    always its nearest prefix, and the rest only add zero hinge terms, while keeping batches
    rectangular and serving dD, whose violations the global descriptor cannot predict.

    Deterministic for a given ``seed`` and call sequence (numpy Generator).
    """

    def __init__(
        self,
        potential_positives: Sequence[np.ndarray],
        non_negatives: Sequence[np.ndarray],
        num_db: int,
        num_negatives: int = 10,
        pool_size: int = 1000,
        seed: int = 0,
        *,
        cache_size: int | None = None,
        violating_only: bool = False,
        margin: float = 0.1,
        squared: bool = True,
    ):
        if len(potential_positives) != len(non_negatives):
            raise ValueError(f"{len(potential_positives)} positive lists but {len(non_negatives)} non-negative lists")
        if num_db <= 0 or num_negatives <= 0 or pool_size <= 0:
            raise ValueError("num_db, num_negatives and pool_size must be positive")
        self.num_db = int(num_db)
        self.potential_positives = [np.asarray(p, dtype=np.int64).ravel() for p in potential_positives]
        self.non_negatives = [np.asarray(n, dtype=np.int64).ravel() for n in non_negatives]
        for lists, what in ((self.potential_positives, "positive"), (self.non_negatives, "non-negative")):
            for arr in lists:
                if arr.size and (arr.min() < 0 or arr.max() >= self.num_db):
                    raise ValueError(f"a {what} index lies outside the database of {self.num_db}")
        self.num_negatives = int(num_negatives)
        self.pool_size = int(pool_size)
        self.cache_size = self.num_negatives if cache_size is None else int(cache_size)
        self.violating_only = violating_only
        self.margin = float(margin)
        self.squared = squared
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        has_pos = np.array([p.size > 0 for p in self.potential_positives], dtype=bool)
        self.valid_queries: np.ndarray = np.flatnonzero(has_pos).astype(np.int64)
        self.num_dropped: int = int((~has_pos).sum())
        self.neg_cache: dict[int, np.ndarray] = {}

    def _distances(self, q_desc: np.ndarray, db_desc: np.ndarray, idx: np.ndarray) -> np.ndarray:
        # float32 caches stay float32 (a 1000 x 4096 pool in float64 costs time for no gain)
        dtype = np.result_type(db_desc.dtype, q_desc.dtype, np.float32)
        diff = db_desc[idx].astype(dtype, copy=False) - q_desc.astype(dtype, copy=False)
        d_sq = np.einsum("ij,ij->i", diff, diff)
        return d_sq if self.squared else np.sqrt(d_sq)

    def negatives_of(self, q_idx: int) -> np.ndarray:
        """All negatives of a query (database images that are not non-negatives)."""
        mask = np.ones(self.num_db, dtype=bool)
        mask[self.non_negatives[q_idx]] = False
        return np.flatnonzero(mask)

    def mine(self, q_idx: int, q_desc: np.ndarray, db_desc: np.ndarray) -> tuple[int, np.ndarray]:
        """One round for one query: ``(positive db index, negative db indices, hardest first)``.

        ``q_desc`` (D,) is the query's cached descriptor, ``db_desc`` (num_db, D) the database's.
        Raises ValueError for a dropped query (no potential positive) or mismatched shapes.
        """
        q_idx = int(q_idx)
        if not 0 <= q_idx < len(self.potential_positives):
            raise ValueError(f"query index {q_idx} out of range")
        pos_cands = self.potential_positives[q_idx]
        if pos_cands.size == 0:
            raise ValueError(f"query {q_idx} has no potential positive (it is dropped)")
        q_desc = np.asarray(q_desc).ravel()
        db_desc = np.asarray(db_desc)
        if db_desc.ndim != 2 or db_desc.shape[0] != self.num_db or db_desc.shape[1] != q_desc.size:
            raise ValueError(f"db_desc must be ({self.num_db}, {q_desc.size}), got {db_desc.shape}")

        d_pos_all = self._distances(q_desc, db_desc, pos_cands)
        best = int(np.argmin(d_pos_all))  # first minimum: ties go to the lowest index
        pos_idx, d_pos = int(pos_cands[best]), float(d_pos_all[best])

        negatives = self.negatives_of(q_idx)
        if negatives.size == 0:
            return pos_idx, np.zeros(0, dtype=np.int64)
        pool = self.rng.choice(negatives, size=min(self.pool_size, negatives.size), replace=False)
        cached = self.neg_cache.get(q_idx, np.zeros(0, dtype=np.int64))
        cands = np.union1d(pool, cached).astype(np.int64)  # sorted, so ties break by index
        d_neg = self._distances(q_desc, db_desc, cands)
        order = np.argsort(d_neg, kind="stable")
        cands, d_neg = cands[order], d_neg[order]
        self.neg_cache[q_idx] = cands[: self.cache_size].copy()

        chosen = cands[: self.num_negatives]
        if self.violating_only:
            violating = d_neg[: self.num_negatives] < d_pos + self.margin
            chosen = chosen[violating]
        return pos_idx, chosen.copy()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (cache and RNG), so a resumed run mines as the original would."""
        return {
            "rng": self.rng.bit_generator.state,
            "neg_cache": {str(k): v.tolist() for k, v in self.neg_cache.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.rng = np.random.default_rng(self.seed)
        self.rng.bit_generator.state = state["rng"]
        self.neg_cache = {int(k): np.asarray(v, dtype=np.int64) for k, v in state["neg_cache"].items()}

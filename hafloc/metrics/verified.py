"""Benchmark scoring with re-ranking by verified local matches (``hafloc eval --rerank K``).

The protocol is unchanged: the global ranking's top K of every query is reordered by the
fused score (``hafloc.index.rerank.FusionRule``) before the protocol's own filtering (timestamps,
panorama NMS, junk). Local features are computed only for queries and retrieved candidates and
cached on disk, keyed like the descriptor cache (absolute path, size, mtime, crop box).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from hafloc.errors import InputError
from hafloc.index.rerank import Reranker, Rule, Verified, default_rule, verified_evidence

log = logging.getLogger(__name__)

MEMO_IMAGES = 2000  # database images' local features kept in memory between queries


@dataclass
class RerankSettings:
    """Which local features verify how many candidates, fused by which rule."""

    k: int = 10
    extractor: str = "xfeat"
    conf: dict[str, Any] = field(default_factory=dict)
    rule: Rule | None = None  # None: the default for the extractor (the shipped scorer for xfeat)

    def __post_init__(self) -> None:
        if self.rule is None:
            from hafloc.index.rerank import RERANK_MATCHERS

            self.rule = default_rule(self.extractor, RERANK_MATCHERS.get(self.extractor, ("lightglue", {}))[0])

    def summary(self) -> dict[str, Any]:
        assert self.rule is not None
        return {"k": self.k, "extractor": self.extractor, "conf": dict(self.conf), "rule": self.rule.to_dict()}


class RankReranker:
    """A callable (Nq, M) ranks -> ranks with each row's first K reordered by verification.

    Inlier counts are kept per (query, database) pair (``pair_inliers``), so the same re-ranker
    called again with a smaller ``k`` (or the same candidates) verifies nothing twice, and a caller
    can fit a rule on them or report them.
    """

    def __init__(
        self,
        settings: RerankSettings,
        reranker: Reranker,
        db_paths: Sequence[Path],
        q_paths: Sequence[Path],
        db_desc: np.ndarray,
        q_desc: np.ndarray,
        load: Callable[[Path, tuple | None], Any],
        key: Callable[[Path, tuple | None], str],
        cache: Any = None,
        q_boxes: Sequence[tuple] | None = None,
        progress: bool = True,
    ):
        self.settings = settings
        self.reranker = reranker
        self.db_paths, self.q_paths, self.q_boxes = list(db_paths), list(q_paths), q_boxes
        self.db_desc, self.q_desc = db_desc, q_desc
        self.load, self.key, self.cache = load, key, cache
        self.progress = progress
        self.k = settings.k
        self._db_memo: dict[int, Any] = {}
        self.pair_inliers: dict[tuple[int, int], int] = {}
        self.pair_verified: dict[tuple[int, int], Verified] = {}  # without correspondences
        self.queries_verified: set[int] = set()
        self.failures: list[tuple[str, str]] = []
        self.seconds = {"query_features": 0.0, "db_features": 0.0, "matching": 0.0}
        self.query_seconds: list[float] = []  # per verifying call: query features + matching (not db features)

    def _features(self, path: Path, box: tuple | None) -> Any:
        from hafloc.local import LocalFeatures

        key = self.key(path, box)
        feats = self.cache.get(key) if self.cache is not None else None
        if feats is None:
            try:
                feats = self.reranker.features(self.load(path, box))
            except InputError as err:
                self.failures.append((str(path), err.cause))
                return LocalFeatures.empty(self.reranker.extractor.descriptor_dim, (0, 0))
            if self.cache is not None:
                self.cache.put(key, feats)
        return feats

    def _db(self, j: int) -> Any:
        if j not in self._db_memo:
            if len(self._db_memo) >= MEMO_IMAGES:  # bounded memory: the disk cache holds the rest
                self._db_memo.pop(next(iter(self._db_memo)))
            self._db_memo[j] = self._features(self.db_paths[j], None)
        return self._db_memo[j]

    def inliers(self, i: int, cands: np.ndarray) -> np.ndarray:
        """Verified inliers of query ``i`` with each database index in ``cands`` (memoised per pair)."""
        todo = [int(j) for j in cands if (i, int(j)) not in self.pair_inliers]
        if todo:
            t0 = time.perf_counter()
            qf = self._features(self.q_paths[i], None if self.q_boxes is None else self.q_boxes[i])
            t1 = time.perf_counter()
            dbf = [self._db(j) for j in todo]
            t2 = time.perf_counter()
            empty = np.zeros((0, 2), np.float32)
            for j, v in zip(todo, self.reranker.verify(qf, dbf)):
                self.pair_inliers[(i, j)] = v.inliers
                self.pair_verified[(i, j)] = Verified(v.inliers, empty, empty, v.matches, v.model, v.spread)
            self.seconds["query_features"] += t1 - t0
            self.seconds["db_features"] += t2 - t1
            self.seconds["matching"] += time.perf_counter() - t2
            self.query_seconds.append(time.perf_counter() - t2 + t1 - t0)
            self.queries_verified.add(i)
        return np.array([self.pair_inliers[(i, int(j))] for j in cands], dtype=np.int64)

    def __call__(self, ranks: np.ndarray) -> np.ndarray:
        k = min(self.k, ranks.shape[1])
        out = ranks.copy()
        rule = self.settings.rule or self.reranker.rule
        for i in tqdm(range(len(ranks)), desc="re-rank", unit="query", disable=not self.progress, dynamic_ncols=True):
            cands = ranks[i, :k]
            cands = cands[cands >= 0]
            if not len(cands):
                continue
            inl = self.inliers(i, cands)
            ev = verified_evidence([self.pair_verified[(i, int(j))] for j in cands])
            sims = self.db_desc[cands] @ self.q_desc[i]
            out[i, : len(cands)] = cands[rule.order(sims, inl, **ev)]
        return out

    def summary(self) -> dict[str, Any]:
        n = max(len(self.queries_verified), 1)
        return {
            **self.settings.summary(),
            "k": self.k,
            "queries": len(self.queries_verified),
            "seconds_per_query": {k: round(v / n, 4) for k, v in self.seconds.items()},
            "query_seconds": {
                "median": round(float(np.median(self.query_seconds)), 4) if self.query_seconds else None,
                "p95": round(float(np.percentile(self.query_seconds, 95)), 4) if self.query_seconds else None,
            },
            "failures": [list(f) for f in self.failures],
        }

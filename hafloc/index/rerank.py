"""Re-rank retrieved candidates by geometrically verified local matches.

Verified geometry finds the same *scene*, not the same *spot*: a facade seen from 60 m away
shares many inliers with the query. Ranking by raw inlier count therefore loses to global
similarity as soon as more candidates are verified. The fused score keeps similarity in charge
and lets verification reorder only candidates whose similarity is close to the best one::

    evidence = e / (e + half),  e = max(0, inliers - min_inliers)       in [0, 1)
    fused    = similarity + weight * evidence

``evidence`` ignores inlier counts a random pair reaches (``min_inliers``) and saturates, so a
candidate more than ``weight`` (cosine) below the best similarity can never overtake it,
however many candidates are verified: re-ranking the top 50 cannot push the answer further
down than re-ranking the top 10. ``fit_fusion`` chooses the three numbers on a validation
split (or the index's own leave-one-out), keeping ``weight = 0`` (global order) unless
verification helps there.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from hafloc.index.store import Match
    from hafloc.local import LocalFeatures

FUSION_VERSION = 1


@dataclass(frozen=True)
class FusionRule:
    """How similarity and verified inliers combine into one ranking score."""

    weight: float = 0.08
    min_inliers: float = 12.0
    half: float = 40.0

    def evidence(self, inliers: np.ndarray | Sequence[float]) -> np.ndarray:
        e = np.maximum(0.0, np.asarray(inliers, dtype=np.float64) - self.min_inliers)
        return e / (e + self.half)

    def scores(self, similarities: np.ndarray | Sequence[float], inliers: np.ndarray | Sequence[float]) -> np.ndarray:
        return np.asarray(similarities, dtype=np.float64) + self.weight * self.evidence(inliers)

    def order(self, similarities: np.ndarray | Sequence[float], inliers: np.ndarray | Sequence[float]) -> np.ndarray:
        """Indices best first along the last axis; ties keep the global (input) order."""
        return np.argsort(-self.scores(similarities, inliers), axis=-1, kind="stable")

    def to_dict(self) -> dict[str, Any]:
        return {"version": FUSION_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "FusionRule":
        if not d:
            return cls()
        return cls(
            weight=float(d.get("weight", cls.weight)),
            min_inliers=float(d.get("min_inliers", cls.min_inliers)),
            half=float(d.get("half", cls.half)),
        )


WEIGHTS = (0.0, 0.02, 0.04, 0.08, 0.12, 0.2, 0.3)
MIN_INLIERS = (0.0, 8.0, 12.0, 20.0, 30.0)
HALVES = (10.0, 25.0, 40.0, 80.0)


def fit_fusion(similarities: np.ndarray, inliers: np.ndarray, correct: np.ndarray) -> tuple[FusionRule, dict[str, Any]]:
    """The rule with the best top-1 accuracy on (Nq, K) candidates; ties favour smaller weights.

    ``correct[i, j]``: candidate j of query i is a right answer. Rows without any correct
    candidate cannot change the score and are ignored. Returns (rule, stats) where stats holds
    the top-1 accuracy of the global order and of the chosen rule on these rows.
    """
    sims = np.asarray(similarities, dtype=np.float64)
    inl = np.asarray(inliers, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if sims.shape != inl.shape or sims.shape != ok.shape or sims.ndim != 2:
        raise ValueError(f"shapes differ: similarities {sims.shape}, inliers {inl.shape}, correct {ok.shape}")
    rows = ok.any(axis=1)
    sims, inl, ok = sims[rows], inl[rows], ok[rows]
    n = len(sims)
    base = float(ok[:, 0].mean()) if n else 0.0
    best, best_acc = FusionRule(weight=0.0), base
    if n:
        for weight, t, half in itertools.product(WEIGHTS[1:], MIN_INLIERS, HALVES):
            rule = FusionRule(weight=weight, min_inliers=t, half=half)
            top = rule.order(sims, inl)[:, 0]
            acc = float(ok[np.arange(n), top].mean())
            if acc > best_acc + 1e-9:
                best, best_acc = rule, acc
    return best, {"queries": int(n), "global_top1": base, "fused_top1": best_acc}


# Matchers re-ranking uses per extractor when none is named. XFeat: mutual nearest neighbours at
# cosine >= 0.82 (XFeat's own matching rule) match a query against 10 candidates in about 0.1 s on
# 2 cores, where LighterGlue takes about 1 s (0.1 s per pair at 1024 keypoints), and separate same
# from different places well (GardensPoint/SFU triplets: different places <= 14 inliers, same
# places median 60; AUC 0.998).
RERANK_MATCHERS: dict[str, tuple[str, dict[str, Any]]] = {"xfeat": ("mnn", {"distance_threshold": 0.6})}


# MAGSAC iterations per candidate: 2,000 halve the verification time of 10 candidates against
# 10,000 (outlier-heavy MNN matches run to the cap) and change inlier counts by a few percent.
VERIFY_ITERS = 2000


@dataclass
class Verified:
    """One candidate checked against the query: inlier count and the inlier correspondences."""

    inliers: int
    points_query: np.ndarray  # (I, 2) inlier keypoints in the query, original pixels
    points_db: np.ndarray  # (I, 2) the same in the candidate
    matches: int = 0  # tentative matches before verification
    model: str | None = None  # "F", "H" or None
    spread: float = 0.0  # inlier_spread of the query's inliers


def inlier_spread(points: np.ndarray, image_size: tuple[int, int]) -> float:
    """How much of the query the inliers cover: the area of their 10-90th percentile box over the
    image's area, square-rooted (0 for fewer than 4 points; 1 = spread over the whole image).
    Inliers bunched on one patch (a logo, a repeated window) cover little."""
    if len(points) < 4 or min(image_size) <= 0:
        return 0.0
    lo, hi = np.percentile(np.asarray(points, np.float64), [10, 90], axis=0)
    w, h = float(image_size[0]), float(image_size[1])
    return float(np.sqrt(max(0.0, (hi[0] - lo[0]) / w) * max(0.0, (hi[1] - lo[1]) / h)))


class Reranker:
    """A local-feature extractor and its matcher, loaded once; verifies candidates of a query.

    ``extractor``/``conf`` name a ``hafloc.local`` extractor (an index records both), ``rule``
    fuses the verification with global similarity.
    """

    def __init__(
        self,
        extractor: str = "xfeat",
        conf: dict[str, Any] | None = None,
        matcher: str | None = None,
        matcher_conf: dict[str, Any] | None = None,
        rule: FusionRule | None = None,
    ):
        from hafloc.local import create_extractor, create_matcher

        self.extractor = create_extractor(extractor, **(conf or {}))
        if matcher is None:
            matcher, default_conf = RERANK_MATCHERS.get(extractor, (self.extractor.default_matcher, {}))
            matcher_conf = {**default_conf, **(matcher_conf or {})}
        self.matcher = create_matcher(matcher, extractor=extractor, **(matcher_conf or {}))
        self.rule = rule or FusionRule()

    def features(self, img: Any) -> "LocalFeatures":
        return self.extractor.extract(img)

    def features_path(self, path: Any) -> "LocalFeatures":
        return self.extractor.extract_path(path)

    def verify(self, query: "LocalFeatures", candidates: Sequence["LocalFeatures | None"]) -> list[Verified]:
        """Verified inliers of every candidate (a missing candidate counts 0)."""
        from hafloc.local import verify

        present = [c for c in candidates if c is not None]
        results = iter(self.matcher.match_many(query, present) if present and len(query) else [])
        out = []
        empty = np.zeros((0, 2), np.float32)
        for cand in candidates:
            if cand is None or not len(query):
                out.append(Verified(0, empty, empty))
                continue
            m = next(results)
            v = verify(query.keypoints, cand.keypoints, m.matches, max_iters=VERIFY_ITERS)
            pairs = m.matches[v.inlier_mask] if v.inliers else np.zeros((0, 2), np.int64)
            pq = query.keypoints[pairs[:, 0]]
            out.append(
                Verified(
                    int(v.inliers),
                    pq,
                    cand.keypoints[pairs[:, 1]],
                    matches=len(m.matches),
                    model=v.model,
                    spread=inlier_spread(pq, query.image_size),
                )
            )
        return out


def rerank_matches(matches: Sequence["Match"], verified: Sequence[Verified], rule: FusionRule) -> list["Match"]:
    """The first ``len(verified)`` matches reordered by the fused score (inliers and score set),
    the rest behind them in global order."""
    top = list(matches[: len(verified)])
    if not top:
        return list(matches)
    sims = [m.similarity for m in top]
    inl = [v.inliers for v in verified]
    scores = rule.scores(sims, inl)
    order = rule.order(sims, inl)
    return [dataclasses.replace(top[i], inliers=int(inl[i]), score=float(scores[i])) for i in order] + list(
        matches[len(top) :]
    )


# Leave-one-out verification is ~20 ms per candidate pair on a CPU: calibrating with re-ranking
# locates at most this many database photos unless asked for more.
RERANK_CALIBRATION_SAMPLES = 500


class LooReranker:
    """The re-ranking hook of the index's leave-one-out calibration (``calibrate_index(rerank=...)``).

    A database photo is the query, with its stored local features; its top ``k`` candidates are
    verified against theirs and reordered by ``rule``. Inlier counts are memoised per pair, and
    every query's candidates are recorded (similarities, inliers, right or wrong) so a rule can be
    fitted on one pass and applied on the next without verifying anything twice.
    """

    def __init__(self, store: Any, reranker: Reranker, k: int = 10, agree_m: float = 25.0):
        self.store, self.reranker, self.k, self.agree_m = store, reranker, k, agree_m
        rows = store.images()  # id order, the order of store.descriptors() rows
        self.row_ids = [int(r["id"]) for r in rows]
        self.row_pos = [(r["lat"], r["lon"]) for r in rows]
        self.pairs: dict[tuple[int, int], int] = {}
        self.records: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __call__(self, row: int, matches: list["Match"]) -> list["Match"]:
        from hafloc.index.locate import haversine_m

        qid = self.row_ids[row]
        top = matches[: self.k]
        todo = [m.id for m in top if (qid, m.id) not in self.pairs]
        if todo:
            feats = self.store.local_features([qid, *todo])
            for mid, v in zip(todo, self.reranker.verify(feats[qid], [feats.get(i) for i in todo])):
                self.pairs[(qid, mid)] = v.inliers
        inl = [self.pairs[(qid, m.id)] for m in top]
        lat, lon = self.row_pos[row]
        right = [m.positioned and haversine_m(lat, lon, m.lat, m.lon) <= self.agree_m for m in top]
        self.records[row] = (np.array([m.similarity for m in top]), np.array(inl), np.array(right, bool))
        empty = np.zeros((0, 2), np.float32)
        return rerank_matches(matches, [Verified(n, empty, empty) for n in inl], self.reranker.rule)

    def fit(self) -> tuple[FusionRule, dict[str, Any]]:
        """The fusion rule fitted on every recorded query (those with k candidates)."""
        rows = [r for r in self.records.values() if len(r[0]) == self.k]
        if not rows:
            return FusionRule(weight=0.0), {"queries": 0}
        return fit_fusion(*(np.stack([r[i] for r in rows]) for i in range(3)))


def calibrate_reranked(
    store: Any,
    agree_m: float = 25.0,
    exclude_m: float | None = None,
    k: int = 10,
    max_samples: int | None = RERANK_CALIBRATION_SAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> Any:
    """Calibrate an index that stores local features: fit the fusion rule by leave-one-out over the
    database (stored in index.json as ``rerank``), then the confidence with re-ranking applied, as
    ``locate`` will re-rank (the calibration's inliers model then applies)."""
    from hafloc.index.calibrate import calibrate_index

    local = store.local_config
    if not local:
        raise ValueError(f"{store.folder}: the index stores no local features")
    hook = LooReranker(store, Reranker(local["extractor"], local.get("conf"), rule=FusionRule(weight=0.0)), k, agree_m)
    calibrate_index(store, agree_m, exclude_m, k, max_samples, seed, rerank=hook, progress=progress, write=False)
    rule, stats = hook.fit()
    store.update_info(
        rerank={
            **rule.to_dict(),
            "fitted": {k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in stats.items()},
        }
    )
    hook.reranker.rule = rule
    return calibrate_index(store, agree_m, exclude_m, k, max_samples, seed, rerank=hook, progress=progress)

"""Re-rank retrieved candidates by geometrically verified local matches.

The default rule is learned (``LearnedRule``): each of a query's top-K candidates gets P(right |
evidence) from a logistic regression over its global similarity, gap to the best similarity, rank,
verified inliers, inliers per tentative match, the spread of the inliers over the query and
homography vs fundamental matrix, as a multinomial logit over the K candidates and "none of them":
P(candidate j is right) = exp(s_j) / (1 + sum_k exp(s_k)), s linear in the features. Candidates are
ordered by s, which depends on the candidate alone, so verifying more candidates never reorders
those already verified. The coefficients are fitted on real pairs (``benchmarks/fit_scorer.py``:
Cambridge val, GardensPoint day vs night and Lund; the triplets and ie_tower held out; a refit on
the shipped model's candidates of both street val splits did worse on five of six sets,
BENCHMARKS.md) and shipped as ``rerank_scorer.json``; ``p_verified``, the threshold above which an
answer is called *verified*, is chosen there out of fold. Strong verified evidence can therefore
move a candidate from far down the list to the top, and "never worse than global" is a measured
property (``benchmarks/fit_scorer.py``, ``tests/test_rerank_real.py`` at K = 5, 10, 20, 50), not a
clamp. An index refits its own scorer only from ``REFIT_MIN_QUERIES`` leave-one-out queries and
only when the refit beats the shipped one on held-out folds (``refit_scorer``).

The older ``FusionRule`` keeps similarity in charge and lets verification reorder only
candidates within ``weight`` (cosine) of the best similarity::

    evidence = e / (e + half),  e = max(0, inliers - min_inliers)       in [0, 1)
    fused    = similarity + weight * evidence

It stays for indexes that stored one and for extractors without a shipped scorer.
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

    def scores(
        self, similarities: np.ndarray | Sequence[float], inliers: np.ndarray | Sequence[float], **evidence: Any
    ) -> np.ndarray:
        """The fused score; other per-candidate ``evidence`` (matches, spread, homography) is ignored."""
        return np.asarray(similarities, dtype=np.float64) + self.weight * self.evidence(inliers)

    def order(
        self, similarities: np.ndarray | Sequence[float], inliers: np.ndarray | Sequence[float], **evidence: Any
    ) -> np.ndarray:
        """Indices best first along the last axis; ties keep the global (input) order."""
        return np.argsort(-self.scores(similarities, inliers), axis=-1, kind="stable")

    def is_verified(self, match: "Match") -> bool:
        """The re-ranked first match verifies the answer: more than ``min_inliers`` inliers."""
        return match.inliers is not None and match.inliers > self.min_inliers

    def to_dict(self) -> dict[str, Any]:
        return {"version": FUSION_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Rule":
        """The rule an index stored (``index.json``'s ``rerank``); none, or a learned one, gives a
        ``LearnedRule`` (the shipped scorer when none was stored)."""
        if not d or d.get("kind") == "learned":
            return LearnedRule.from_dict(d) if d else shipped_rule()
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


# The learned scorer: P(candidate is right | its evidence), a logistic regression over these
# per-candidate features (``candidate_features``), fitted on real pairs by ``benchmarks/fit_scorer.py``
# and shipped as ``rerank_scorer.json`` beside this module.
SCORER_FEATURES = (
    "similarity",  # cosine to the query
    "gap",  # best similarity of the list minus this one
    "log_rank",  # log(1 + global rank), 0 for the first
    "log_inliers",  # log(1 + verified inliers)
    "inlier_ratio",  # inliers / tentative matches
    "spread",  # inlier_spread over the query
    "homography",  # 1 when the verified model is a homography
)
# Signs the fit may not flip (monotone evidence, as the calibration's non-negative coefficients):
# more similarity, inliers, inliers per match or spread never lower a candidate's score, a larger
# gap to the best or a later rank never raise it. Without them collinear features took opposite
# signs and a photo's own copy in the index (every match an inlier) lost to a neighbour.
SCORER_SIGNS: dict[str, tuple[float | None, float | None]] = {
    "similarity": (0.0, None),
    "gap": (None, 0.0),
    "log_rank": (None, 0.0),
    "log_inliers": (0.0, None),
    "inlier_ratio": (0.0, None),
    "spread": (0.0, None),
    "homography": (0.0, None),  # rare in the fitting pairs: a negative weight sank a photo's own copy (H fits it)
}
SCORER_FILE = "rerank_scorer.json"
SCORER_VERSION = 1


def candidate_features(
    similarities: np.ndarray | Sequence[float],
    inliers: np.ndarray | Sequence[float],
    matches: np.ndarray | Sequence[float] | None = None,
    spread: np.ndarray | Sequence[float] | None = None,
    homography: np.ndarray | Sequence[float] | None = None,
) -> np.ndarray:
    """(..., K) candidates of a query in global order -> (..., K, len(SCORER_FEATURES)).

    Missing evidence (an old caller without matches/spread/model) counts as none: ratio 0, spread
    0, no homography. Every feature depends on the candidate alone (and the list's best
    similarity, its first, whatever K is): verifying more candidates never changes the score of
    those already verified.
    """
    sims = np.asarray(similarities, dtype=np.float64)
    inl = np.maximum(np.asarray(inliers, dtype=np.float64), 0.0)
    zeros = np.zeros_like(sims)
    nm = zeros if matches is None else np.asarray(matches, dtype=np.float64)
    sp = zeros if spread is None else np.asarray(spread, dtype=np.float64)
    h = zeros if homography is None else np.asarray(homography, dtype=np.float64)
    k = sims.shape[-1]
    if k == 0:
        return np.zeros((*sims.shape, len(SCORER_FEATURES)))
    rank = np.broadcast_to(np.arange(k, dtype=np.float64), sims.shape)
    li = np.log1p(inl)
    feats = [
        sims,
        sims.max(axis=-1, keepdims=True) - sims,
        np.log1p(rank),
        li,
        np.where(nm > 0, inl / np.maximum(nm, 1.0), 0.0),
        sp,
        h,
    ]
    return np.stack(feats, axis=-1)


def _softmax_with_none(u: np.ndarray) -> np.ndarray:
    m = np.maximum(u.max(axis=-1, keepdims=True), 0.0) if u.shape[-1] else np.zeros((*u.shape[:-1], 1))
    e = np.exp(u - m)
    return e / (np.exp(-m) + e.sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class LearnedRule:
    """Candidates ordered by P(right | evidence): a multinomial logit over the candidates and
    "none of them" (``SCORER_FEATURES``, ``utilities``).

    ``p_verified``: an answer is *verified* when its first candidate's P(right) reaches it (chosen
    on held-out validation queries). ``min_inliers`` is kept for callers that read it (0 here).
    """

    coef: tuple[float, ...]
    intercept: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    p_verified: float = 0.5
    min_inliers: float = 0.0
    fitted: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def utilities(self, similarities: Any, inliers: Any, **evidence: Any) -> np.ndarray:
        """s_j: each candidate's own score (the logit against "none of them")."""
        x = candidate_features(similarities, inliers, **evidence)
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return z @ np.asarray(self.coef) + self.intercept

    def probabilities(self, similarities: Any, inliers: Any, **evidence: Any) -> np.ndarray:
        """P(candidate j is right) = exp(s_j) / (1 + sum_k exp(s_k)) along the last axis."""
        return _softmax_with_none(self.utilities(similarities, inliers, **evidence))

    def scores(self, similarities: Any, inliers: Any, **evidence: Any) -> np.ndarray:
        return self.probabilities(similarities, inliers, **evidence)

    def order(self, similarities: Any, inliers: Any, **evidence: Any) -> np.ndarray:
        """Indices best first along the last axis (by s_j); ties keep the global (input) order."""
        return np.argsort(-self.utilities(similarities, inliers, **evidence), axis=-1, kind="stable")

    def is_verified(self, match: "Match") -> bool:
        """The first re-ranked match verifies the answer: its P(right) (its ``score``) reaches ``p_verified``."""
        return match.score is not None and match.inliers is not None and match.score >= self.p_verified

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "learned",
            "version": SCORER_VERSION,
            "features": list(SCORER_FEATURES),
            "coef": [round(c, 6) for c in self.coef],
            "intercept": round(self.intercept, 6),
            "mean": [round(c, 6) for c in self.mean],
            "scale": [round(c, 6) for c in self.scale],
            "p_verified": round(self.p_verified, 4),
            "fitted": self.fitted,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LearnedRule":
        if list(d.get("features", [])) != list(SCORER_FEATURES):
            raise ValueError(f"a learned re-ranking rule over other features: {d.get('features')}")
        return cls(
            coef=tuple(float(c) for c in d["coef"]),
            intercept=float(d["intercept"]),
            mean=tuple(float(c) for c in d["mean"]),
            scale=tuple(float(c) for c in d["scale"]),
            p_verified=float(d.get("p_verified", 0.5)),
            fitted=dict(d.get("fitted", {})),
        )


Rule = FusionRule | LearnedRule


def default_rule(extractor: str, matcher: str) -> "Rule":
    """The shipped scorer where it was fitted for this extractor and matcher, else the fixed fusion rule."""
    rule = shipped_rule()
    if (rule.fitted.get("extractor"), rule.fitted.get("matcher")) == (extractor, matcher):
        return rule
    return FusionRule()


def shipped_rule() -> LearnedRule:
    """The scorer shipped with hafloc (``rerank_scorer.json``), fitted on real pairs."""
    import json
    from importlib import resources

    return LearnedRule.from_dict(json.loads(resources.files("hafloc.index").joinpath(SCORER_FILE).read_text()))


@dataclass
class Candidates:
    """One query's verified top-K in global order, and which are right (for fitting and evaluation)."""

    similarities: np.ndarray
    inliers: np.ndarray
    matches: np.ndarray
    spread: np.ndarray
    homography: np.ndarray
    right: np.ndarray

    def evidence(self) -> dict[str, np.ndarray]:
        return {"matches": self.matches, "spread": self.spread, "homography": self.homography}

    def head(self, k: int) -> "Candidates":
        return Candidates(*(np.asarray(a)[:k] for a in dataclasses.astuple(self)))


def top1_right(rule: "Rule", queries: Sequence[Candidates], k: int | None = None) -> np.ndarray:
    """Per query: is the rule's first candidate among its top ``k`` (all when None) right?"""
    out = []
    for q in queries:
        c = q.head(k) if k else q
        if not len(c.similarities):
            out.append(False)
            continue
        out.append(bool(c.right[rule.order(c.similarities, c.inliers, **c.evidence())[0]]))
    return np.array(out, bool)


def choose_p_verified(p_top: np.ndarray, right_top: np.ndarray, precision: float = 0.9, min_n: int = 10) -> float:
    """The smallest threshold on the first candidate's P(right) above which at least ``precision``
    of the answers are right (over at least ``min_n`` answers); 1.0 (never verified) when none is."""
    order = np.argsort(-p_top, kind="stable")
    p, r = p_top[order], right_top[order].astype(np.float64)
    prec = np.cumsum(r) / np.arange(1, len(r) + 1)
    ok = [i for i in range(min_n - 1, len(p)) if prec[i] >= precision and (i + 1 == len(p) or p[i + 1] < p[i])]
    return float(p[ok[-1]]) if ok else 1.0


def fit_scorer(
    queries: Sequence[Candidates],
    c: float = 1.0,
    precision: float = 0.9,
    folds: int = 5,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> tuple[LearnedRule, dict[str, Any]]:
    """The multinomial logit over each query's candidates and "none of them", fitted by maximum
    likelihood of the query's right candidates (any of them; "none" when none is right) with an L2
    penalty of ``1 / c`` on the coefficients (``weights``: one per query, e.g. to give every fitting
    set the same total weight); ``p_verified`` from out-of-fold P(right) of each query's re-ranked
    first candidate (folds by query)."""
    from scipy.optimize import minimize

    keep = [i for i, q in enumerate(queries) if len(q.similarities)]
    queries = [queries[i] for i in keep]
    qw = np.ones(len(queries)) if weights is None else np.asarray(weights, np.float64)[keep]

    def fit(idx: np.ndarray) -> LearnedRule:
        qs = [queries[i] for i in idx]
        xs = [candidate_features(q.similarities, q.inliers, **q.evidence()) for q in qs]
        allx = np.concatenate(xs)
        mean, scale = allx.mean(0), np.maximum(allx.std(0), 1e-6)
        zs = [(x - mean) / scale for x in xs]
        ys = [np.asarray(q.right, bool) for q in qs]
        w = qw[np.asarray(idx)]
        w = w / w.sum()
        lam = 1.0 / (c * len(qs))

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            coef, b = theta[:-1], theta[-1]
            total, grad = 0.0, np.zeros_like(theta)
            for z, y, wq in zip(zs, ys, w):
                u = z @ coef + b
                m = max(float(u.max()), 0.0)
                e = np.exp(u - m)
                den = np.exp(-m) + e.sum()
                num = e[y].sum() if y.any() else np.exp(-m)
                total += wq * (np.log(den) - np.log(num))
                g = e / den - (np.where(y, e, 0.0) / num if y.any() else 0.0)
                grad[:-1] += wq * (g @ z)
                grad[-1] += wq * g.sum()
            total += 0.5 * lam * float(coef @ coef)
            grad[:-1] += lam * coef
            return total, grad

        bounds = [SCORER_SIGNS.get(f, (None, None)) for f in SCORER_FEATURES] + [(None, None)]
        res = minimize(loss, np.zeros(allx.shape[1] + 1), jac=True, method="L-BFGS-B", bounds=bounds)
        return LearnedRule(
            tuple(map(float, res.x[:-1])), float(res.x[-1]), tuple(map(float, mean)), tuple(map(float, scale))
        )

    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(queries)) % folds
    p_top, r_top = np.zeros(len(queries)), np.zeros(len(queries), bool)
    for f in range(folds):
        held = np.flatnonzero(fold == f)
        if not len(held):
            continue
        rule = fit(np.flatnonzero(fold != f))
        for i in held:
            q = queries[i]
            p = rule.probabilities(q.similarities, q.inliers, **q.evidence())
            top = int(np.argsort(-p, kind="stable")[0])
            p_top[i], r_top[i] = p[top], q.right[top]
    rule = fit(np.arange(len(queries)))
    threshold = choose_p_verified(p_top, r_top, precision)
    glob = float(np.mean([bool(q.right[0]) for q in queries])) if queries else 0.0
    stats = {
        "queries": len(queries),
        "candidates": int(sum(len(q.similarities) for q in queries)),
        "global_top1": round(glob, 4),
        "heldout_top1": round(float(r_top.mean()), 4) if len(r_top) else 0.0,
        "heldout_verified_share": round(float((p_top >= threshold).mean()), 4) if len(p_top) else 0.0,
        "heldout_verified_precision": round(float(r_top[p_top >= threshold].mean()), 4)
        if (p_top >= threshold).any()
        else None,
    }
    return dataclasses.replace(rule, p_verified=threshold, fitted=stats), stats


# Matchers re-ranking uses per extractor when none is named. XFeat: mutual nearest neighbours at
# cosine >= 0.82 (XFeat's own matching rule). benchmarks/verification.py (BENCHMARKS.md
# "Verification signal", candidates of the shipped model) measured the ROC AUC of inliers for right
# vs wrong top-10 pairs: MNN 1.000 / 0.783 / 0.854 / 0.482 (GardensPoint/SFU triplets, GardensPoint
# day vs night, Lund, ie_tower) against LighterGlue on the best 512 keypoints 0.990 / 0.703 / 0.848 /
# 0.479 and ALIKED + LightGlue 0.998 / 0.694 (triplets, day vs night), at a fifth to a twentieth of
# their cost per pair. MNN with a ratio test at 0.9 separates as well or better everywhere (1.000 /
# 0.844 / 0.896 / 0.546; Cambridge and SF-night val 0.692 / 0.956 against 0.689 / 0.935) at MNN's
# cost. A scorer fitted the same way on its pairs (benchmarks/fit_scorer.py --config mnn_ratio)
# re-ranks to the same top-1 on every set, with P(right) ROC AUC 0.664 / 0.916 on the val splits
# against 0.662 / 0.930 for the shipped one on MNN's pairs: no gain to switch for, so MNN, whose pairs
# the shipped scorer and the re-ranked calibration prior were fitted on, stays the default.
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
        rule: "Rule | None" = None,
    ):
        from hafloc.local import create_extractor, create_matcher

        self.extractor = create_extractor(extractor, **(conf or {}))
        if matcher is None:
            matcher, default_conf = RERANK_MATCHERS.get(extractor, (self.extractor.default_matcher, {}))
            matcher_conf = {**default_conf, **(matcher_conf or {})}
        self.matcher = create_matcher(matcher, extractor=extractor, **(matcher_conf or {}))
        self.rule: Rule = rule or default_rule(extractor, matcher)

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


def verified_evidence(verified: Sequence[Verified]) -> dict[str, np.ndarray]:
    """The per-candidate evidence a rule's ``scores`` takes besides similarities and inliers."""
    return {
        "matches": np.array([v.matches for v in verified], np.float64),
        "spread": np.array([v.spread for v in verified], np.float64),
        "homography": np.array([v.model == "H" for v in verified], np.float64),
    }


def rerank_matches(matches: Sequence["Match"], verified: Sequence[Verified], rule: "Rule") -> list["Match"]:
    """The first ``len(verified)`` matches reordered by the rule's score (inliers and score set:
    the fused similarity, or P(right) for a ``LearnedRule``), the rest behind them in global order."""
    top = list(matches[: len(verified)])
    if not top:
        return list(matches)
    sims = [m.similarity for m in top]
    inl = [v.inliers for v in verified]
    ev = verified_evidence(verified)
    scores = rule.scores(sims, inl, **ev)
    order = np.argsort(-scores, kind="stable")
    return [dataclasses.replace(top[i], inliers=int(inl[i]), score=float(scores[i])) for i in order] + list(
        matches[len(top) :]
    )


# Leave-one-out verification is ~20 ms per candidate pair on a CPU: calibrating with re-ranking
# locates at most this many database photos unless asked for more.
RERANK_CALIBRATION_SAMPLES = 500


class LooReranker:
    """The re-ranking hook of the index's leave-one-out calibration (``calibrate_index(rerank=...)``).

    A database photo is the query, with its stored local features; its top ``k`` candidates are
    verified against theirs and reordered by ``rule``. Verifications are memoised per pair, and
    every query's candidates are recorded (``Candidates``: similarities, evidence, right or wrong)
    so a rule can be fitted on one pass and applied on the next without verifying anything twice.
    """

    def __init__(self, store: Any, reranker: Reranker, k: int = 10, agree_m: float = 25.0):
        self.store, self.reranker, self.k, self.agree_m = store, reranker, k, agree_m
        rows = store.images()  # id order, the order of store.descriptors() rows
        self.row_ids = [int(r["id"]) for r in rows]
        self.row_pos = [(r["lat"], r["lon"]) for r in rows]
        self.pairs: dict[tuple[int, int], Verified] = {}
        self.records: dict[int, Candidates] = {}

    def __call__(self, row: int, matches: list["Match"]) -> list["Match"]:
        from hafloc.index.locate import haversine_m

        qid = self.row_ids[row]
        top = matches[: self.k]
        todo = [m.id for m in top if (qid, m.id) not in self.pairs]
        if todo:
            feats = self.store.local_features([qid, *todo])
            for mid, v in zip(todo, self.reranker.verify(feats[qid], [feats.get(i) for i in todo])):
                empty = np.zeros((0, 2), np.float32)  # the correspondences are not kept
                self.pairs[(qid, mid)] = dataclasses.replace(v, points_query=empty, points_db=empty)
        ver = [self.pairs[(qid, m.id)] for m in top]
        lat, lon = self.row_pos[row]
        right = [m.positioned and haversine_m(lat, lon, m.lat, m.lon) <= self.agree_m for m in top]
        ev = verified_evidence(ver)
        self.records[row] = Candidates(
            np.array([m.similarity for m in top]),
            np.array([v.inliers for v in ver], np.float64),
            ev["matches"],
            ev["spread"],
            ev["homography"],
            np.array(right, bool),
        )
        return rerank_matches(matches, ver, self.reranker.rule)

    def fit(self) -> tuple["Rule", dict[str, Any]]:
        """The rule for this index from every recorded query (those with k candidates): its own
        refitted scorer only with ``REFIT_MIN_QUERIES`` queries and only when it beats the current
        rule's top-1 on held-out folds (``refit_scorer``); else the current rule, unchanged."""
        rows = [r for r in self.records.values() if len(r.similarities) == self.k]
        return refit_scorer(self.reranker.rule, rows)


# An index refits its own scorer only from this many leave-one-out queries: a few dozen overfit
# (a fitted top-1 of 36 -> 46% in-sample on 39 queries went 60.3 -> 59.0 on new photos).
REFIT_MIN_QUERIES = 200


def refit_scorer(
    current: "Rule", queries: Sequence[Candidates], folds: int = 5, seed: int = 0
) -> tuple["Rule", dict[str, Any]]:
    """``current`` or a scorer refitted on ``queries``: the refit must beat ``current``'s top-1 on
    held-out folds (each fold's scorer fitted on the other folds), over at least REFIT_MIN_QUERIES."""
    stats: dict[str, Any] = {"queries": len(queries), "refit": False}
    if len(queries) < REFIT_MIN_QUERIES:
        stats["reason"] = f"fewer than {REFIT_MIN_QUERIES} leave-one-out queries: the shipped rule"
        return current, stats
    fold = np.random.default_rng(seed).permutation(len(queries)) % folds
    held_refit, held_current = [], []
    for f in range(folds):
        train = [q for q, g in zip(queries, fold) if g != f]
        held = [q for q, g in zip(queries, fold) if g == f]
        if not held or not any(q.right.any() for q in train) or all(q.right.all() for q in train):
            continue
        rule, _ = fit_scorer(train)
        held_refit.append(top1_right(rule, held))
        held_current.append(top1_right(current, held))
    if not held_refit:
        stats["reason"] = "no right and wrong candidates to fit on"
        return current, stats
    a, b = float(np.concatenate(held_refit).mean()), float(np.concatenate(held_current).mean())
    stats.update(heldout_top1_refit=round(a, 4), heldout_top1_current=round(b, 4))
    if a <= b:
        stats["reason"] = "the refit does not beat the shipped rule on held-out folds"
        return current, stats
    rule, fit_stats = fit_scorer(queries)
    stats.update(refit=True, fitted=fit_stats)
    return dataclasses.replace(rule, fitted={**rule.fitted, **_matcher_tag(current)}), stats


def _matcher_tag(rule: "Rule") -> dict[str, Any]:
    fitted = getattr(rule, "fitted", {}) or {}
    return {k: fitted[k] for k in ("extractor", "matcher", "matcher_conf") if k in fitted}


def calibrate_reranked(
    store: Any,
    agree_m: float = 25.0,
    exclude_m: float | None = None,
    k: int = 10,
    max_samples: int | None = RERANK_CALIBRATION_SAMPLES,
    seed: int = 0,
    progress: bool = True,
    min_samples: int | None = None,
    probes: Any = None,
) -> Any:
    """Calibrate an index that stores local features: verify the leave-one-out queries of the
    database with the default rule (the shipped scorer), refit the scorer on them only where
    ``refit_scorer`` allows (stored in index.json as ``rerank``, with the refit's statistics), then
    the confidence with re-ranking applied, as ``locate`` will re-rank."""
    from hafloc.index.calibrate import MIN_SAMPLES, calibrate_index

    at_least = MIN_SAMPLES if min_samples is None else min_samples
    local = store.local_config
    if not local:
        raise ValueError(f"{store.folder}: the index stores no local features")
    hook = LooReranker(store, Reranker(local["extractor"], local.get("conf")), k, agree_m)
    fit_kw: dict[str, Any] = {"rerank": hook, "progress": progress, "min_samples": at_least}
    calibrate_index(store, agree_m, exclude_m, k, max_samples, seed, write=False, **fit_kw)
    rule, stats = hook.fit()
    store.update_info(rerank={**rule.to_dict(), "refit": stats})
    hook.reranker.rule = rule
    return calibrate_index(store, agree_m, exclude_m, k, max_samples, seed, probes=probes, **fit_kw)

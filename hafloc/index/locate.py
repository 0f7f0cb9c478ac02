"""Turn retrieved matches into a position estimate with a confidence.

Verified matches: the best one (by re-ranking score) anchors the estimate. Global matches: the
place with the most similarity mass does (kNN spatial voting: three views of one street corner
just below an isolated look-alike win). Matches within ``agree_m`` of the anchor are averaged
(similarity-weighted, in the anchor's UTM zone). Confidence combines how much of the similarity
mass agrees with how clearly the agreeing place beats the best disagreeing one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, cast

import numpy as np

from hafloc.datasets.geo import haversine_m, latlon_to_utm, utm_to_latlon
from hafloc.index.store import IndexStore, Match


class VerifyRule(Protocol):
    """What decides that a re-ranked answer is verified (``hafloc.index.rerank``'s rules)."""

    def is_verified(self, match: Match) -> bool: ...


@dataclass
class Estimate:
    lat: float
    lon: float
    confidence: float  # in [0, 1]
    agreement: float  # fraction of positioned similarity mass that agrees with the estimate
    margin: float  # best agreeing similarity - best disagreeing one (1.0 when none disagree)
    n_agreeing: int
    matches: list[Match]  # the input matches, with distance_m from the estimate
    verified: bool = False  # the anchor shares verified geometry with the query


def rank_score(m: Match) -> float:
    """What orders matches: the re-ranking score when there is one, else global similarity."""
    return m.similarity if m.score is None else m.score


# Chosen on the val splits of Cambridge and SF night (benchmarks/voting.py): the share of estimates
# within 25 m of the truth peaked at 0.02 for the shipped model (0.01-0.05 tried, K = 5, 10, 20).
VOTE_TEMPERATURE = 0.02


def _anchor(positioned: list[Match], agree_m: float, temperature: float) -> Match:
    """The match whose ``agree_m`` neighbourhood holds the most vote mass (ties: the more similar)."""
    top = max(map(rank_score, positioned))
    vote = [math.exp((rank_score(m) - top) / temperature) for m in positioned]

    def mass(a: Match) -> float:
        assert a.lat is not None and a.lon is not None
        return sum(v for m, v in zip(positioned, vote) if haversine_m(a.lat, a.lon, m.lat, m.lon) <= agree_m)

    return max(positioned, key=lambda a: (mass(a), rank_score(a)))


def estimate_position(
    matches: Sequence[Match],
    agree_m: float = 25.0,
    margin_scale: float = 0.1,
    temperature: float = 0.05,
    min_inliers: "float | VerifyRule | None" = None,
    vote_temperature: float = VOTE_TEMPERATURE,
) -> Estimate | None:
    """Similarity-weighted position of the matches agreeing with the anchor (see the module).

    The anchor and the averaged position use votes ``exp((s - s_top) / vote_temperature)``; the
    agreement uses ``exp((s - s_top) / temperature)``: a match far less similar than the top one
    barely counts, so a long tail of unrelated top-k matches does not dilute a clear answer.
    ``confidence = agreement * (0.5 + 0.5 * min(1, margin / margin_scale))``: full agreement and a
    similarity gap of ``margin_scale`` (cosine) to the best disagreeing match give 1 (a top match
    outvoted by a denser place gives a negative margin). None when no match has a position.
    Similarities are re-ranking scores (``rank_score``) where matches carry them, and then the best
    one anchors and only the scored (verified) matches count: verification already weighed them.
    ``verified``: ``min_inliers`` is the re-ranking rule, and its ``is_verified(anchor)`` (the
    learned scorer: the anchor's P(right) reaches its validated threshold), or a number, and the
    anchor has more verified inliers than that.
    """
    positioned = [m for m in matches if m.positioned]
    if any(m.score is not None for m in positioned):
        # matches past the re-ranked ones carry a cosine, not a P(right): on another scale, they
        # would outweigh verified candidates, so only the scored ones place the answer
        positioned = [m for m in positioned if m.score is not None]
    if not positioned:
        return None
    if positioned[0].score is not None:
        best = max(positioned, key=rank_score)
    else:
        best = _anchor(positioned, agree_m, vote_temperature)
    assert best.lat is not None and best.lon is not None
    agree = [m for m in positioned if haversine_m(best.lat, best.lon, m.lat, m.lon) <= agree_m]
    agree_ids = {id(m) for m in agree}
    others = [m for m in positioned if id(m) not in agree_ids]
    top = max(map(rank_score, positioned))
    weight = {id(m): math.exp((rank_score(m) - top) / temperature) for m in positioned}
    w = np.array([math.exp((rank_score(m) - top) / vote_temperature) for m in agree])
    try:
        _, _, zone, letter = latlon_to_utm(best.lat, best.lon)
        xy = np.array([latlon_to_utm(m.lat, m.lon, (zone, letter))[:2] for m in agree])
        e, n = (xy * w[:, None]).sum(0) / w.sum()
        lat, lon = utm_to_latlon(float(e), float(n), zone, letter)
    except ValueError:  # beyond UTM's latitudes; over <= agree_m, averaging degrees is as good
        ll = np.array([(m.lat, m.lon) for m in agree], dtype=np.float64)
        lat, lon = (float(v) for v in (ll * w[:, None]).sum(0) / w.sum())
    agreement = float(sum(weight[id(m)] for m in agree) / sum(weight.values()))
    margin = 1.0 if not others else max(map(rank_score, agree)) - max(map(rank_score, others))
    confidence = agreement * (0.5 + 0.5 * min(1.0, max(0.0, margin) / margin_scale))
    with_dist = [
        dataclasses.replace(m, distance_m=haversine_m(lat, lon, m.lat, m.lon) if m.positioned else None)
        for m in matches
    ]
    if isinstance(min_inliers, (int, float)):
        verified = best.inliers is not None and best.inliers > min_inliers
    else:
        verified = min_inliers is not None and bool(min_inliers.is_verified(best))
    return Estimate(
        lat=lat,
        lon=lon,
        confidence=float(min(1.0, max(0.0, confidence))),
        agreement=agreement,
        margin=float(margin),
        n_agreeing=len(agree),
        matches=with_dist,
        verified=verified,
    )


def _round(x: float | None, nd: int) -> float | None:
    return None if x is None else round(float(x), nd)


# Unrelated photos (noise, a blank frame, another domain) still find *some* match, and how similar
# they get depends on the model and the index (cosine ~0.5 with untrained models, 0.2-0.3 with the
# trained default, whose right matches score 0.4-0.5 at the median). So the floor is measured per index:
# u, the best similarity blank and noise frames (``calibrate.probe_images``) reach on it. Every
# confidence, calibrated or not, is scaled by clip((s - u) / UNRELATED_GATE_WIDTH, 0, 1), s the
# query's best similarity.
UNRELATED_GATE_WIDTH = 0.1


def unrelated_gate(best_similarity: float, floor: float | None) -> float:
    """0 at or below ``floor`` (the probes' best similarity), rising linearly to 1 over ``UNRELATED_GATE_WIDTH``;
    1 when the floor is unknown (None)."""
    if floor is None:
        return 1.0
    return float(min(1.0, max(0.0, (best_similarity - floor) / UNRELATED_GATE_WIDTH)))


def fallback_confidence(estimate: Estimate | None, unrelated: float | None = None) -> float:
    """Confidence of an index without a calibration: the heuristic times the ``unrelated_gate`` of the
    index's unrelated similarity ``unrelated`` (``calibrate.unrelated_similarity``)."""
    if estimate is None:
        return 0.0
    best = max((m.similarity for m in estimate.matches if m.positioned), default=0.0)
    return float(estimate.confidence * unrelated_gate(best, unrelated))


def result_json(
    name: str,
    matches: Sequence[Match],
    estimate: Estimate | None,
    confidence: float | None = None,
    calibrated: bool = False,
    radius_m: float | None = None,
    min_confidence: float | None = None,
    unrelated: float | None = None,
) -> dict[str, Any]:
    """The JSON object ``hafloc locate --json`` prints for one query image.

    ``confidence`` (default: ``fallback_confidence`` gated by ``unrelated``) is reported in the estimate; with
    ``min_confidence`` a less confident estimate becomes ``"estimate": null`` plus
    ``"unknown": {"reason", "confidence"}`` (as does a query none of whose matches has a position).
    """
    shown = estimate.matches if estimate is not None else list(matches)
    conf = fallback_confidence(estimate, unrelated) if confidence is None else float(confidence)
    unknown = None
    if estimate is None:
        unknown = {"reason": "no match has a position", "confidence": 0.0}
    elif min_confidence is not None and conf < min_confidence:
        unknown = {
            "reason": f"confidence {conf:.2f} below the minimum {min_confidence:g}"
            + ("" if calibrated else " (uncalibrated index)"),
            "confidence": round(conf, 4),
        }
    out: dict[str, Any] = {
        "image": name,
        "estimate": None
        if unknown is not None or estimate is None
        else {
            "lat": round(estimate.lat, 7),
            "lon": round(estimate.lon, 7),
            "confidence": round(conf, 4),
            "verified": estimate.verified,
        },
        "calibrated": bool(calibrated),
    }
    if radius_m is not None:
        out["radius_m"] = float(radius_m)
    if unknown is not None:
        out["unknown"] = unknown
    out["matches"] = [
        {
            "image": m.image,
            "root": m.root,
            "lat": _round(m.lat, 7),
            "lon": _round(m.lon, 7),
            "similarity": round(float(m.similarity), 6),
            "distance_m": _round(m.distance_m, 2),
            "inliers": m.inliers,
        }
        for m in shown
    ]
    return out


def locate_descriptors(
    store: IndexStore,
    descs: np.ndarray,
    names: Sequence[str],
    k: int = 10,
    agree_m: float = 25.0,
    calibrator: Any = None,
    min_confidence: float | None = None,
    unrelated: float | None = None,
) -> list[dict[str, Any]]:
    """Locate query descriptors (Nq, D) against ``store``: one ``result_json`` per name.

    ``calibrator`` (``hafloc.index.calibrate.Calibrator``, or None for the fallback) turns the
    estimate of its own top-``calibrator.k`` matches into the reported confidence; without one,
    ``unrelated`` (the index's unrelated similarity) gates the fallback.
    """
    descs = np.atleast_2d(np.asarray(descs, dtype=np.float32))
    if len(descs) != len(names):
        raise ValueError(f"{len(descs)} descriptors for {len(names)} names")
    if len(names) == 0:
        return []
    depth = max(k, calibrator.k) if calibrator is not None else k
    all_matches = cast(list[list[Match]], store.search(descs, depth))  # (Nq, D) in: one list per query
    return [
        answer(name, ms, k, agree_m, calibrator, min_confidence, unrelated=unrelated)
        for name, ms in zip(names, all_matches)
    ]


def answer(
    name: str,
    matches: Sequence[Match],
    k: int,
    agree_m: float = 25.0,
    calibrator: Any = None,
    min_confidence: float | None = None,
    min_inliers: "float | VerifyRule | None" = None,
    unrelated: float | None = None,
) -> dict[str, Any]:
    """One query's ``result_json`` from its (at least ``max(k, calibrator.k)``) ranked matches.

    Calibrated: the estimate and its features come from the top ``calibrator.k`` matches, as in the
    leave-one-out the calibrator was fitted on, at the calibrator's radius; ``k`` matches are shown.
    ``min_inliers``: re-ranked matches verify the estimate above this many inliers, or by this
    re-ranking rule's ``is_verified``. Uncalibrated: ``unrelated`` gates the fallback confidence.
    """
    if calibrator is None:
        est = estimate_position(list(matches)[:k], agree_m, min_inliers=min_inliers)
        return result_json(
            name, list(matches)[:k], est, radius_m=agree_m, min_confidence=min_confidence, unrelated=unrelated
        )
    est = estimate_position(list(matches)[: calibrator.k], calibrator.agree_m, min_inliers=min_inliers)
    conf = calibrator.confidence(list(matches)[: calibrator.k], est)
    shown = list(matches)[:k]
    if est is not None:
        shown = [
            dataclasses.replace(m, distance_m=haversine_m(est.lat, est.lon, m.lat, m.lon) if m.positioned else None)
            for m in shown
        ]
        est = dataclasses.replace(est, matches=shown)
    return result_json(
        name, shown, est, confidence=conf, calibrated=True, radius_m=calibrator.agree_m, min_confidence=min_confidence
    )

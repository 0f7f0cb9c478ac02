"""Turn retrieved matches into a position estimate with a confidence.

The best positioned match (by re-ranking score when the matches were verified, else by
similarity) anchors the estimate; matches within ``agree_m`` of it vote for the
same place and are averaged (similarity-weighted, in the anchor's UTM zone). Confidence combines
how much of the similarity mass agrees with how clearly the agreeing place beats the best
disagreeing one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from hafloc.index.positions import latlon_to_utm, utm_to_latlon
from hafloc.index.store import IndexStore, Match

EARTH_RADIUS_M = 6_371_008.8


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres (exact enough at any scale, unlike one UTM zone)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


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


def estimate_position(matches: Sequence[Match], agree_m: float = 25.0, margin_scale: float = 0.1,
                      temperature: float = 0.05, min_inliers: float | None = None) -> Estimate | None:
    """Similarity-weighted position of the matches agreeing with the best positioned one.

    Votes are ``exp((s - s_best) / temperature)``: a match far less similar than the best one
    barely counts, so a long tail of unrelated top-k matches does not dilute a clear answer.
    ``confidence = agreement * (0.5 + 0.5 * min(1, margin / margin_scale))``: full agreement and a
    similarity gap of ``margin_scale`` (cosine) to the best disagreeing match give 1. None when no
    match has a position. Similarities are re-ranking scores (``rank_score``) where matches carry
    them; ``verified``: the anchor has more than ``min_inliers`` verified inliers.
    """
    positioned = [m for m in matches if m.positioned]
    if not positioned:
        return None
    best = max(positioned, key=rank_score)
    assert best.lat is not None and best.lon is not None
    agree = [m for m in positioned if haversine_m(best.lat, best.lon, m.lat, m.lon) <= agree_m]  # type: ignore[arg-type]
    agree_ids = {id(m) for m in agree}
    others = [m for m in positioned if id(m) not in agree_ids]
    weight = {id(m): math.exp((rank_score(m) - rank_score(best)) / temperature) for m in positioned}
    w = np.array([weight[id(m)] for m in agree])
    try:
        _, _, zone, letter = latlon_to_utm(best.lat, best.lon)
        xy = np.array([latlon_to_utm(m.lat, m.lon, (zone, letter))[:2] for m in agree])  # type: ignore[arg-type]
        e, n = (xy * w[:, None]).sum(0) / w.sum()
        lat, lon = utm_to_latlon(float(e), float(n), zone, letter)
    except ValueError:  # beyond UTM's latitudes; over <= agree_m, averaging degrees is as good
        ll = np.array([(m.lat, m.lon) for m in agree], dtype=np.float64)
        lat, lon = (float(v) for v in (ll * w[:, None]).sum(0) / w.sum())
    agreement = float(w.sum() / sum(weight.values()))
    margin = 1.0 if not others else max(map(rank_score, agree)) - max(map(rank_score, others))
    confidence = agreement * (0.5 + 0.5 * min(1.0, max(0.0, margin) / margin_scale))
    with_dist = [dataclasses.replace(m, distance_m=haversine_m(lat, lon, m.lat, m.lon) if m.positioned else None)
                 for m in matches]  # type: ignore[arg-type]
    verified = min_inliers is not None and best.inliers is not None and best.inliers > min_inliers
    return Estimate(lat=lat, lon=lon, confidence=float(min(1.0, max(0.0, confidence))), agreement=agreement,
                    margin=float(margin), n_agreeing=len(agree), matches=with_dist, verified=verified)


def _round(x: float | None, nd: int) -> float | None:
    return None if x is None else round(float(x), nd)


def result_json(name: str, matches: Sequence[Match], estimate: Estimate | None) -> dict[str, Any]:
    """The JSON object ``hafloc locate --json`` prints for one query image."""
    shown = estimate.matches if estimate is not None else list(matches)
    return {
        "image": name,
        "estimate": None if estimate is None else {
            "lat": round(estimate.lat, 7), "lon": round(estimate.lon, 7),
            "confidence": round(estimate.confidence, 4), "verified": estimate.verified},
        "matches": [{"image": m.image, "root": m.root, "lat": _round(m.lat, 7), "lon": _round(m.lon, 7),
                     "similarity": round(float(m.similarity), 6), "distance_m": _round(m.distance_m, 2),
                     "inliers": m.inliers}
                    for m in shown],
    }


def locate_descriptors(store: IndexStore, descs: np.ndarray, names: Sequence[str], k: int = 10,
                       agree_m: float = 25.0) -> list[dict[str, Any]]:
    """Locate query descriptors (Nq, D) against ``store``: one ``result_json`` per name."""
    descs = np.atleast_2d(np.asarray(descs, dtype=np.float32))
    if len(descs) != len(names):
        raise ValueError(f"{len(descs)} descriptors for {len(names)} names")
    if len(names) == 0:
        return []
    all_matches = store.search(descs, k)
    return [result_json(name, ms, estimate_position(ms, agree_m)) for name, ms in zip(names, all_matches)]

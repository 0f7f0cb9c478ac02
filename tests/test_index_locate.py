"""Position estimate from matches: weighting, agreement radius, confidence."""

from __future__ import annotations

import dataclasses
import math

import pytest

from hafloc.datasets.geo import haversine_m
from hafloc.index.locate import estimate_position
from hafloc.index.store import Match

LAT0, LON0 = 48.8584, 2.2945
M_PER_DEG_LAT = 111_195.0  # mean metres per degree of latitude on the 6371 km sphere


def m(i: int, sim: float, north_m: float | None, east_m: float = 0.0) -> Match:
    if north_m is None:
        return Match(id=i, image=f"img{i}.jpg", root="/r", similarity=sim)
    lat = LAT0 + north_m / M_PER_DEG_LAT
    lon = LON0 + east_m / (M_PER_DEG_LAT * math.cos(math.radians(LAT0)))
    return Match(id=i, image=f"img{i}.jpg", root="/r", similarity=sim, lat=lat, lon=lon)


def north_of_origin(lat: float) -> float:
    return (lat - LAT0) * M_PER_DEG_LAT


def test_weighted_mean_of_agreeing_matches():
    # 0 m (sim .9) and 20 m north (sim .8) agree; 500 m north (sim .5) does not. Position votes
    # are exp((s - s_top) / 0.02), agreement weights exp((s - s_top) / 0.05), worked out here.
    w1, w2, w3 = 1.0, math.exp((0.8 - 0.9) / 0.05), math.exp((0.5 - 0.9) / 0.05)
    v2 = math.exp((0.8 - 0.9) / 0.02)
    est = estimate_position([m(1, 0.9, 0.0), m(2, 0.8, 20.0), m(3, 0.5, 500.0)])
    assert est is not None and est.n_agreeing == 2
    north = 20.0 * v2 / (1.0 + v2)
    assert north_of_origin(est.lat) == pytest.approx(north, abs=0.3)
    assert haversine_m(LAT0, LON0, LAT0, est.lon) < 0.3
    assert est.agreement == pytest.approx((w1 + w2) / (w1 + w2 + w3), abs=1e-6)
    assert est.margin == pytest.approx(0.4, abs=1e-6)
    assert est.confidence == pytest.approx(est.agreement, abs=1e-6)  # margin >= 0.1 saturates the margin term
    assert [x.distance_m for x in est.matches] == pytest.approx([north, 20 - north, 500 - north], abs=0.5)
    # the votes' temperature is a parameter: at 0.05 they are the agreement weights
    soft = estimate_position([m(1, 0.9, 0.0), m(2, 0.8, 20.0), m(3, 0.5, 500.0)], vote_temperature=0.05)
    assert north_of_origin(soft.lat) == pytest.approx(20.0 * w2 / (w1 + w2), abs=0.3)
    # equal similarities: a plain average of the two agreeing positions
    even = estimate_position([m(1, 0.9, 0.0), m(2, 0.9, 20.0)])
    assert north_of_origin(even.lat) == pytest.approx(10.0, abs=0.3)


def test_the_place_with_most_votes_beats_an_isolated_top_match():
    # one look-alike 400 m away at .80; three views of one corner at .79, .785 and .78
    ms = [m(1, 0.80, 400.0), m(2, 0.79, 0.0), m(3, 0.785, 8.0), m(4, 0.78, -6.0), m(5, 0.5, 2000.0)]
    est = estimate_position(ms)
    assert est is not None and est.n_agreeing == 3
    assert abs(north_of_origin(est.lat)) < 8.0
    assert est.margin == pytest.approx(0.79 - 0.80)  # outvoted top match: the margin is negative
    assert est.confidence == pytest.approx(est.agreement * 0.5)
    # a clear lead still wins: at .85 the look-alike holds more mass than the three at ~.785
    lead = estimate_position([m(1, 0.85, 400.0), *ms[1:]])
    assert lead is not None and north_of_origin(lead.lat) == pytest.approx(400.0, abs=0.5)
    # re-ranked matches (scores from verification): the best score anchors, no vote
    scored = [dataclasses.replace(x, score=x.similarity) for x in ms]
    ranked = estimate_position(scored)
    assert ranked is not None and north_of_origin(ranked.lat) == pytest.approx(400.0, abs=0.5)


def test_matches_past_the_reranked_ones_do_not_place_the_answer():
    # top 2 re-ranked (P(right) .6 at 0 m, .05 at 900 m); 3 and 4 past the re-ranked depth carry
    # only their cosines (.7, .69 at 2 km), on another scale than P(right): they must not anchor,
    # join the agreement or pull the position
    verified = [dataclasses.replace(m(1, 0.40, 0.0), score=0.6), dataclasses.replace(m(2, 0.45, 900.0), score=0.05)]
    est = estimate_position([*verified, m(3, 0.70, 2000.0), m(4, 0.69, 2005.0)])
    assert est is not None and abs(north_of_origin(est.lat)) < 0.5
    assert est.n_agreeing == 1 and est.agreement > 0.99
    assert len(est.matches) == 4  # all are still listed, with their distances


def test_unpositioned_matches_are_ignored_and_kept():
    est = estimate_position([m(1, 0.95, None), m(2, 0.7, 0.0, east_m=30.0)])
    assert est is not None and est.n_agreeing == 1 and est.confidence == pytest.approx(1.0)
    assert haversine_m(est.lat, est.lon, LAT0, LON0) == pytest.approx(30.0, abs=0.3)
    assert est.matches[0].distance_m is None and est.matches[1].distance_m == pytest.approx(0.0, abs=0.01)
    assert estimate_position([m(1, 0.9, None)]) is None
    assert estimate_position([]) is None


def test_confidence_falls_with_disagreement_and_small_margin():
    clear = estimate_position([m(1, 0.9, 0.0), m(2, 0.85, 5.0), m(3, 0.3, 900.0)])
    split = estimate_position([m(1, 0.9, 0.0), m(2, 0.89, 900.0), m(3, 0.88, 1800.0)])
    assert clear is not None and split is not None
    assert 0.0 <= split.confidence < 0.25 < 0.8 < clear.confidence <= 1.0
    # agreement radius is a parameter
    wide = estimate_position([m(1, 0.9, 0.0), m(2, 0.89, 900.0)], agree_m=1000.0)
    assert wide is not None and wide.n_agreeing == 2

"""The fusion rule of re-ranking: properties that make it safe at any K, and its fitting."""

from __future__ import annotations

import numpy as np

from hafloc.index.rerank import FusionRule, Verified, fit_fusion, rerank_matches
from hafloc.index.store import Match


def test_zero_weight_keeps_the_global_order():
    rng = np.random.default_rng(0)
    sims = -np.sort(-rng.random((20, 15)), axis=1)
    inl = rng.integers(0, 500, (20, 15))
    order = FusionRule(weight=0.0).order(sims, inl)
    assert (order == np.arange(15)).all()


def test_a_candidate_far_below_the_best_never_overtakes_it():
    # however many inliers the distant candidates have, only those within `weight` of the best can pass it
    rule = FusionRule(weight=0.1, min_inliers=10, half=20)
    rng = np.random.default_rng(1)
    for _ in range(200):
        sims = -np.sort(-rng.uniform(0.2, 0.9, 50))
        inl = rng.integers(0, 2000, 50)
        inl[0] = 0  # the best by similarity has no verification at all
        top = rule.order(sims, inl)[0]
        assert sims[0] - sims[top] < rule.weight
        # growing K only adds candidates below: those beyond the band never become first
        for k in (5, 10, 20, 50):
            top_k = rule.order(sims[:k], inl[:k])[0]
            assert sims[0] - sims[top_k] < rule.weight


def test_evidence_ignores_chance_inliers_and_saturates():
    rule = FusionRule(weight=0.1, min_inliers=12, half=40)
    ev = rule.evidence([0, 5, 12, 13, 52, 10_000])
    assert ev[0] == ev[1] == ev[2] == 0.0
    assert 0 < ev[3] < ev[4] < ev[5] < 1.0
    assert abs(ev[4] - 0.5) < 1e-12  # half the way at min_inliers + half


def test_fit_keeps_global_order_when_inliers_say_nothing():
    rng = np.random.default_rng(2)
    n, k = 300, 10
    sims = -np.sort(-rng.random((n, k)), axis=1)
    correct = np.zeros((n, k), bool)
    correct[np.arange(n), rng.integers(0, 3, n)] = True
    inl = rng.integers(0, 100, (n, k))  # unrelated to correctness
    rule, stats = fit_fusion(sims, inl, correct)
    assert stats["fused_top1"] >= stats["global_top1"]
    # whatever it picked must not be worse on these rows, and with no signal it gains little
    assert stats["fused_top1"] - stats["global_top1"] < 0.06


def test_fit_uses_inliers_that_identify_the_right_candidate():
    rng = np.random.default_rng(3)
    n, k = 200, 10
    sims = -np.sort(-rng.uniform(0.5, 0.6, (n, k)), axis=1)
    right = rng.integers(0, k, n)
    correct = np.zeros((n, k), bool)
    correct[np.arange(n), right] = True
    inl = rng.integers(0, 10, (n, k))
    inl[np.arange(n), right] = rng.integers(60, 300, n)
    rule, stats = fit_fusion(sims, inl, correct)
    assert rule.weight > 0
    assert stats["fused_top1"] > 0.95 > stats["global_top1"]


def test_rerank_matches_reorders_the_verified_head_only():
    ms = [Match(id=i, image=f"{i}.jpg", root="/r", similarity=1.0 - 0.01 * i) for i in range(6)]
    empty = np.zeros((0, 2), np.float32)
    verified = [Verified(n, empty, empty) for n in (0, 0, 300, 0)]
    out = rerank_matches(ms, verified, FusionRule(weight=0.1, min_inliers=10, half=20))
    assert [m.id for m in out] == [2, 0, 1, 3, 4, 5]
    assert [m.inliers for m in out] == [300, 0, 0, 0, None, None]
    assert out[0].score is not None and out[0].similarity == ms[2].similarity
    assert out[4].score is None

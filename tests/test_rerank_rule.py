"""The fusion rule of re-ranking: properties that make it safe at any K, and its fitting."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from hafloc.index.rerank import (
    RERANK_MATCHERS,
    SCORER_FEATURES,
    Candidates,
    FusionRule,
    LearnedRule,
    Verified,
    candidate_features,
    choose_p_verified,
    fit_fusion,
    fit_scorer,
    refit_scorer,
    rerank_matches,
    shipped_rule,
    top1_right,
)
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


# --- the learned scorer (P(right) by logistic regression), its refit policy and "verified" ---


def _queries(n: int, k: int, seed: int, signal: bool) -> list[Candidates]:
    """Synthetic queries in global order: with ``signal`` the right candidate (anywhere in the list)
    has many inliers spread over the image and wrong ones few."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sims = -np.sort(-rng.uniform(0.3, 0.7, k))
        right = np.zeros(k, bool)
        right[rng.integers(0, k)] = True
        inl = rng.integers(0, 15, k).astype(float)
        if signal:
            inl[right] = rng.integers(40, 300, right.sum())
        else:
            inl = rng.integers(0, 300, k).astype(float)
        matches = inl + rng.integers(20, 200, k)
        spread = np.where(inl > 30, rng.uniform(0.3, 0.8, k), rng.uniform(0.0, 0.3, k))
        out.append(Candidates(sims, inl, matches, spread, rng.integers(0, 2, k).astype(float), right))
    return out


def test_candidate_features_do_not_depend_on_k_and_more_candidates_never_reorder_the_first():
    sims = np.array([0.8, 0.7, 0.6, 0.5])
    inl = np.array([10.0, 100.0, 0.0, 50.0])
    x = candidate_features(sims, inl)
    assert x.shape == (4, len(SCORER_FEATURES))
    assert np.allclose(candidate_features(sims[:2], inl[:2]), x[:2])
    # batched (Nq, K) equals per-row
    assert np.allclose(candidate_features(np.stack([sims, sims]), np.stack([inl, inl]))[1], x)
    rule, _ = fit_scorer(_queries(200, 10, 5, signal=True))
    rng = np.random.default_rng(6)
    for _ in range(50):
        s = -np.sort(-rng.uniform(0.3, 0.8, 50))
        n = rng.integers(0, 400, 50).astype(float)
        full = rule.order(s, n)
        for k in (5, 10, 20):
            # the first k keep their relative order whatever is verified behind them
            assert list(rule.order(s[:k], n[:k])) == [i for i in full if i < k]
        p = rule.probabilities(s, n)
        assert (p > 0).all() and p.sum() < 1  # "none of them" keeps the rest


def test_fit_scorer_learns_inliers_and_round_trips_through_json():
    rule, stats = fit_scorer(_queries(300, 10, 0, signal=True))
    assert stats["heldout_top1"] > 0.95 > stats["global_top1"]
    test = _queries(100, 10, 1, signal=True)
    assert top1_right(rule, test).mean() > 0.95
    assert 0 < rule.p_verified <= 1
    again = FusionRule.from_dict(json.loads(json.dumps(rule.to_dict())))
    assert isinstance(again, LearnedRule)
    q = test[0]
    assert np.allclose(
        again.probabilities(q.similarities, q.inliers, **q.evidence()),
        rule.probabilities(q.similarities, q.inliers, **q.evidence()),
    )


def test_refit_needs_200_queries_and_must_beat_the_current_rule_on_held_out_folds():
    shipped = shipped_rule()
    rule, stats = refit_scorer(shipped, _queries(150, 10, 2, signal=True))
    assert rule is shipped and not stats["refit"] and "200" in stats["reason"]
    # inliers unrelated to the answer: the refit cannot beat the current rule out of fold
    rule, stats = refit_scorer(FusionRule(weight=0.0), _queries(250, 10, 3, signal=False))
    assert not stats["refit"] or stats["heldout_top1_refit"] > stats["heldout_top1_current"]
    # a real signal the global order misses: the refit wins and is taken
    rule, stats = refit_scorer(FusionRule(weight=0.0), _queries(250, 10, 4, signal=True))
    assert stats["refit"] and isinstance(rule, LearnedRule)
    assert stats["heldout_top1_refit"] > stats["heldout_top1_current"]


def test_choose_p_verified_reaches_the_precision():
    p = np.linspace(1, 0, 100)
    right = np.arange(100) < 50  # the 50 most confident are right
    right[[5, 20]] = False
    t = choose_p_verified(p, right, precision=0.9)
    sel = p >= t
    assert right[sel].mean() >= 0.9 and sel.sum() >= 50
    assert choose_p_verified(p, np.zeros(100, bool)) == 1.0


def test_verified_means_p_right_above_the_threshold():
    rule = shipped_rule()
    m = Match(id=1, image="a.jpg", root="/r", similarity=0.5, inliers=80, score=rule.p_verified)
    assert rule.is_verified(m)
    assert not rule.is_verified(dataclasses.replace(m, score=rule.p_verified - 1e-3))
    assert not rule.is_verified(dataclasses.replace(m, inliers=None, score=None))


def test_shipped_scorer_never_saw_the_triplets_it_is_tested_on():
    rule = shipped_rule()
    assert rule.fitted["extractor"] == "xfeat" and rule.fitted["matcher"] == RERANK_MATCHERS["xfeat"][0]
    assert rule.fitted["matcher_conf"] == RERANK_MATCHERS["xfeat"][1]
    assert "triplets" not in rule.fitted["sets"]  # tests/test_rerank_real.py's target set
    coef = dict(zip(SCORER_FEATURES, rule.coef))
    assert coef["log_inliers"] > 0  # more verified inliers never make a candidate less likely

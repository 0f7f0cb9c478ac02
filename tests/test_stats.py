"""hafloc.metrics.stats: the paired bootstrap against closed forms and its defining properties,
the seeds' spread, and per-query hits taken from a real scoring of descriptors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hafloc.datasets.base import Dataset
from hafloc.metrics.evaluate import DatasetDescriptors, EvalResult, score_descriptors
from hafloc.metrics.stats import hits_at, mean_std, paired_bootstrap, pool_runs


def test_identical_inputs_give_a_zero_interval():
    a = np.random.default_rng(1).integers(0, 2, 300).astype(float)
    r = paired_bootstrap(a, a.copy(), n_boot=2000)
    assert (r.mean_diff, r.low, r.high) == (0.0, 0.0, 0.0)
    assert not r.excludes_zero()


def test_constant_difference_is_exact():
    a = np.linspace(0, 1, 50)
    r = paired_bootstrap(a + 0.25, a, n_boot=500)
    assert r.mean_diff == pytest.approx(0.25) and r.low == pytest.approx(0.25) and r.high == pytest.approx(0.25)


def test_interval_width_matches_the_normal_closed_form():
    # hits that differ on 30 % of 2000 queries, in both directions: the bootstrap SD of the mean
    # difference is sd(d)/sqrt(Q) (population sd), so the 95 % half-width is 1.96 times that
    rng = np.random.default_rng(7)
    q = 2000
    a = rng.integers(0, 2, q).astype(float)
    b = a.copy()
    flip = rng.random(q) < 0.3
    b[flip] = 1 - b[flip]
    d = a - b
    r = paired_bootstrap(a, b, n_boot=20_000, seed=3)
    half = 1.959964 * d.std() / math.sqrt(q)
    assert r.mean_diff == pytest.approx(d.mean())
    assert (r.high - r.low) / 2 == pytest.approx(half, rel=0.05)
    assert (r.low + r.high) / 2 == pytest.approx(d.mean(), abs=0.15 * half)
    assert r.n_queries == q and r.ci == 0.95


def test_a_real_shift_excludes_zero_and_noise_does_not():
    rng = np.random.default_rng(0)
    base = (rng.random(500) < 0.5).astype(float)
    better = base.copy()
    fixed = np.flatnonzero(base == 0)[:60]  # 60 of 500 queries found only by the better method
    better[fixed] = 1.0
    r = paired_bootstrap(better, base)
    assert r.excludes_zero() and r.low > 0 and r.mean_diff == pytest.approx(0.12)
    assert "+12.0 [" in r.format(scale=100)
    # two unrelated coin flips of the same rate: an interval around 0
    noise = paired_bootstrap((rng.random(500) < 0.5).astype(float), (rng.random(500) < 0.5).astype(float))
    assert noise.low < noise.mean_diff < noise.high


def test_seed_determinism_and_wider_intervals_at_higher_confidence():
    rng = np.random.default_rng(2)
    a, b = rng.random(80), rng.random(80)
    r1, r2 = paired_bootstrap(a, b, n_boot=3000, seed=5), paired_bootstrap(a, b, n_boot=3000, seed=5)
    assert r1 == r2
    r3 = paired_bootstrap(a, b, n_boot=3000, seed=6)
    assert r3.mean_diff == r1.mean_diff and (r3.low, r3.high) != (r1.low, r1.high)
    r99 = paired_bootstrap(a, b, n_boot=3000, seed=5, ci=0.99)
    assert r99.low < r1.low and r99.high > r1.high


def test_runs_are_pooled_per_query():
    # two seeds of a: per-query means 1, 0.5, 0; b: one run
    a = np.array([[1, 1, 0], [1, 0, 0]], dtype=float)
    b = np.array([0, 0.5, 0])
    assert pool_runs(a).tolist() == [1.0, 0.5, 0.0]
    r = paired_bootstrap(a, b, n_boot=100)
    assert r.mean_diff == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap(np.ones(4), np.ones(5))
    with pytest.raises(ValueError, match="ci"):
        paired_bootstrap(np.ones(4), np.ones(4), ci=1.5)


def test_mean_std():
    m = mean_std([60.0, 62.0, 64.0])
    assert (m.mean, m.std, m.n) == (62.0, 2.0, 3)
    assert m.format() == "62.0 ± 2.0"
    one = mean_std([55.5])
    assert one.n == 1 and math.isnan(one.std) and one.format() == "55.5" and one.to_json()["std"] is None
    assert mean_std([]).format() == "-"


def test_query_first_hits_from_a_scored_label_set():
    # 3 places; query 1 failed to load (a miss); query 2 finds its place at rank 2
    ds = Dataset(
        name="t",
        format="labels",
        root=".",
        db_images=["a", "b", "c"],
        q_images=["qa", "qb", "qc"],
        db_labels=np.array([0, 1, 2]),
        q_labels=np.array([0, 1, 2]),
    )
    db = np.eye(3, dtype=np.float32)
    q = np.array([[1, 0, 0], [0.79, 0.1, 0.6]], dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d = DatasetDescriptors(db=db, q=q, db_ok=np.arange(3), q_ok=np.array([0, 2]))
    r = score_descriptors(ds, d)
    res = EvalResult(
        metrics={k: v for k, v in r.items() if not k.startswith("_")},
        ranks=r["_ranks"],
        dataset=r["_dataset"],
        q_index=r["_q_index"],
    )
    fh = res.query_first_hits()
    assert fh.tolist() == [0, -1, 1]
    assert hits_at(fh, 1).tolist() == [1.0, 0.0, 0.0]
    assert hits_at(fh, 5).tolist() == [1.0, 0.0, 1.0]
    # the hits average to the protocol's recall (failed queries counted as misses)
    assert 100 * hits_at(fh, 1).mean() == pytest.approx(res["recall@1"])
    assert 100 * hits_at(fh, 5).mean() == pytest.approx(res["recall@5"])
    assert hits_at([None, 3], 4).tolist() == [0.0, 1.0]

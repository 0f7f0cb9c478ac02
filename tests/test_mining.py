"""Mining: GPS/label candidates (fixtures and real ground truth) and hard-negative mining."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from hafloc.train.mining import HardNegativeMiner, gps_candidates, label_candidates


def _shared_data() -> Path:
    root = Path(os.environ.get("HAFLOC_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real test data not found at {root} (set HAFLOC_SHARED_DATA)")
    return root


# --------------------------------------------------------------------------- fixture
# A street along the x axis: database images every 5 m from x=0 to x=200 (index i at 5*i m).
DB_X = np.arange(0.0, 201.0, 5.0)
DB_UTM = np.stack([DB_X + 585000.0, np.full_like(DB_X, 4477000.0)], axis=1)  # Pittsburgh-like UTM
# queries: q0 at x=2, q1 exactly on db image 10 (x=50), q2 far away (no positive), q3 at x=197
Q_X = np.array([2.0, 50.0, 1000.0, 197.0])
Q_UTM = np.stack([Q_X + 585000.0, np.full_like(Q_X, 4477000.0 + 0.0)], axis=1)


def test_gps_candidates_radii():
    pos, nonneg = gps_candidates(DB_UTM, Q_UTM)
    # q0 at x=2: within 10 m -> x in {0, 5, 10}; within 25 m -> x <= 27 -> {0..25}
    assert pos[0].tolist() == [0, 1, 2]
    assert nonneg[0].tolist() == [0, 1, 2, 3, 4, 5]
    # q1 at x=50 (index 10): 10 m inclusive -> x in 40..60, 25 m inclusive -> 25..75
    assert pos[1].tolist() == [8, 9, 10, 11, 12]
    assert nonneg[1].tolist() == list(range(5, 16))
    assert pos[2].size == 0 and nonneg[2].size == 0
    assert pos[3].tolist() == [38, 39, 40]
    for p, n in zip(pos, nonneg):
        assert set(p) <= set(n)
        assert p.dtype == np.int64


def test_gps_candidates_excludes_trivial_positives_but_keeps_them_non_negative():
    pos, nonneg = gps_candidates(DB_UTM, Q_UTM, exclude_trivial_sq=1.0)
    assert 10 not in pos[1] and 10 in nonneg[1]
    assert pos[1].tolist() == [8, 9, 11, 12]
    assert pos[0].tolist() == [0, 1, 2]  # d^2 = 4, 9, 64 all > 1


def test_gps_candidates_rejects_bad_input():
    with pytest.raises(ValueError):
        gps_candidates(DB_UTM.T, Q_UTM)
    with pytest.raises(ValueError):
        gps_candidates(DB_UTM, Q_UTM, pos_radius=30.0, neg_radius=25.0)
    bad = Q_UTM.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        gps_candidates(DB_UTM, bad)


def test_gps_candidates_match_brute_force_on_pitts30k_geometry():
    gt = np.load(_shared_data() / "ground_truth" / "patchnetvlad_gt" / "dataset_gt_files" / "pitts30k_test.npz")
    db, q = gt["utmDb"], gt["utmQ"]
    pos, nonneg = gps_candidates(db, q)
    assert len(pos) == len(q) == 6816
    rng = np.random.default_rng(0)
    for i in rng.choice(len(q), 150, replace=False):
        d = np.linalg.norm(db - q[i], axis=1)
        assert pos[i].tolist() == np.flatnonzero(d <= 10.0).tolist()
        assert nonneg[i].tolist() == np.flatnonzero(d <= 25.0).tolist()
    # every query of the standard test set has a database image within 25 m (its R@N ground truth)
    assert all(n.size > 0 for n in nonneg)


def test_label_candidates_fixture_and_real_csv():
    pos, nonneg = label_candidates(["a", "b", "a", "c", "b"], ["b", "a", "z"])
    assert [p.tolist() for p in pos] == [[1, 4], [0, 2], []]
    assert [n.tolist() for n in nonneg] == [[1, 4], [0, 2], []]

    with open(_shared_data() / "ie_tower_floors" / "dataset.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    db = [r["label"] for r in rows if r["split"] == "gallery"]
    qs = [r["label"] for r in rows if r["split"] == "query"]
    pos, nonneg = label_candidates(db, qs)
    assert len(pos) == len(qs)
    db_arr = np.asarray(db)
    for i in range(0, len(qs), 37):
        assert pos[i].tolist() == np.flatnonzero(db_arr == qs[i]).tolist()
        assert nonneg[i].tolist() == pos[i].tolist()
    assert sum(p.size for p in pos) == sum(db.count(label) for label in qs)


# --------------------------------------------------------------------------- mining
def _line_descriptors() -> tuple[np.ndarray, np.ndarray]:
    """Descriptors (D=3) with known answers for query 0 (x=2; positives 0-2; negatives 6..40).

    Query descriptor = e0. Positive 1 is the closest positive. Database images 20, 30, 35 are
    the hardest negatives, in that order; every other negative is far.
    """
    db = np.tile(np.array([0.0, 0.0, 5.0]), (len(DB_X), 1))
    db[0] = [0.0, 2.0, 0.0]  # positive, distance ~2.24
    db[1] = [1.0, 0.5, 0.0]  # positive, distance 0.5   <- chosen positive
    db[2] = [0.0, 0.0, 1.5]  # positive, distance ~1.80
    db[3] = [1.0, 0.0, 0.0]  # inside 25 m: identical to the query, must never be a negative
    db[20] = [1.0, 0.0, 0.3]  # hardest negative, distance 0.3
    db[30] = [1.0, 0.6, 0.0]  # distance 0.6
    db[35] = [1.0, 0.0, 0.8]  # distance 0.8
    q = np.zeros((len(Q_X), 3))
    q[:, 0] = 1.0
    return q, db


def _miner(**kw) -> HardNegativeMiner:
    pos, nonneg = gps_candidates(DB_UTM, Q_UTM)
    kw.setdefault("num_negatives", 3)
    return HardNegativeMiner(pos, nonneg, num_db=len(DB_X), **kw)


def test_miner_picks_nearest_positive_and_hardest_true_negatives():
    q, db = _line_descriptors()
    miner = _miner(pool_size=10_000)  # the pool covers every negative
    pos_idx, neg_idx = miner.mine(0, q[0], db)
    assert pos_idx == 1
    assert neg_idx.tolist() == [20, 30, 35]
    # negatives are beyond 25 m; the identical-looking image 3 (within 25 m) is excluded
    assert np.all(np.abs(DB_X[neg_idx] - Q_X[0]) > 25.0)
    assert 3 not in miner.negatives_of(0)


def test_miner_drops_queries_without_positives():
    q, db = _line_descriptors()
    miner = _miner()
    assert miner.valid_queries.tolist() == [0, 1, 3]
    assert miner.num_dropped == 1
    with pytest.raises(ValueError, match="no potential positive"):
        miner.mine(2, q[2], db)
    with pytest.raises(ValueError):
        miner.mine(0, q[0], db[:, :2])  # wrong descriptor dimension


def test_miner_keeps_last_rounds_hardest_negatives():
    q, db = _line_descriptors()
    hardest = 20
    # a pool of 2 out of 35 negatives: the hardest is drawn only now and then
    with_cache = _miner(pool_size=2, num_negatives=1, seed=3)
    no_cache = _miner(pool_size=2, num_negatives=1, seed=3, cache_size=0)
    found = [with_cache.mine(0, q[0], db)[1][0] for _ in range(60)]
    first = found.index(hardest)  # it must turn up within 60 rounds ...
    assert all(n == hardest for n in found[first:])  # ... and then never be lost again
    # the cache is the only reason: without it the hardest comes and goes
    plain = [no_cache.mine(0, q[0], db)[1][0] for _ in range(60)]
    assert hardest in plain and plain.count(hardest) < 30
    # with the cache, hardness never decreases from one round to the next
    dist = [np.linalg.norm(db[n] - q[0]) for n in found]
    assert all(b <= a + 1e-12 for a, b in zip(dist, dist[1:]))


def test_miner_violating_only_rule():
    q, db = _line_descriptors()
    # squared distances: d_pos^2 = 0.25; negatives 0.09, 0.36, 0.64; margin 0.1 -> < 0.35
    miner = _miner(pool_size=10_000, violating_only=True, margin=0.1)
    assert miner.mine(0, q[0], db)[1].tolist() == [20]
    miner = _miner(pool_size=10_000, violating_only=True, margin=0.5)  # < 0.75: all three
    assert miner.mine(0, q[0], db)[1].tolist() == [20, 30, 35]
    far = db.copy()
    far[[20, 30, 35]] = [0.0, 0.0, 5.0]
    miner = _miner(pool_size=10_000, violating_only=True, margin=0.1)
    assert miner.mine(0, q[0], far)[1].size == 0  # nothing violates: NetVLAD skips the query


def test_miner_is_deterministic_and_resumable():
    rng = np.random.default_rng(11)
    db = rng.normal(size=(len(DB_X), 8))
    q = rng.normal(size=(len(Q_X), 8))
    a, b = _miner(pool_size=5, seed=7), _miner(pool_size=5, seed=7)
    run_a = [a.mine(i, q[i], db) for i in (0, 1, 3, 0, 1, 3)]
    run_b = [b.mine(i, q[i], db) for i in (0, 1, 3, 0, 1, 3)]
    for (pa, na), (pb, nb) in zip(run_a, run_b):
        assert pa == pb and na.tolist() == nb.tolist()

    state = json.loads(json.dumps(a.state_dict()))
    resumed = _miner(pool_size=5, seed=999)
    resumed.load_state_dict(state)
    for i in (0, 1, 3):
        pa, na = a.mine(i, q[i], db)
        pr, nr = resumed.mine(i, q[i], db)
        assert pa == pr and na.tolist() == nr.tolist()


def test_miner_on_pitts30k_geometry_respects_radii():
    gt = np.load(_shared_data() / "ground_truth" / "patchnetvlad_gt" / "dataset_gt_files" / "pitts30k_test.npz")
    db_utm, q_utm = gt["utmDb"], gt["utmQ"]
    pos, nonneg = gps_candidates(db_utm, q_utm)
    miner = HardNegativeMiner(pos, nonneg, num_db=len(db_utm), num_negatives=10, pool_size=1000, seed=0)
    assert miner.num_dropped == sum(p.size == 0 for p in pos) > 0
    rng = np.random.default_rng(0)
    db_desc = rng.normal(size=(len(db_utm), 16)).astype(np.float32)
    q_desc = rng.normal(size=(len(q_utm), 16)).astype(np.float32)
    for i in miner.valid_queries[::300]:
        p, negs = miner.mine(i, q_desc[i], db_desc)
        assert np.linalg.norm(db_utm[p] - q_utm[i]) <= 10.0
        assert len(negs) == 10 and len(set(negs.tolist())) == 10
        assert np.all(np.linalg.norm(db_utm[negs] - q_utm[i], axis=1) > 25.0)
        d = np.linalg.norm(db_desc[negs] - q_desc[i], axis=1)
        assert np.all(np.diff(d) >= 0)  # hardest first

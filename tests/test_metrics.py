"""Metrics: hand-worked cases, brute-force references, Tokyo NMS and TokyoTM exclusion fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from hafloc.datasets.base import Dataset
from hafloc.datasets.detect import load_dataset
from hafloc.metrics.ap import average_precision, compute_ap, mean_average_precision, revisited_map
from hafloc.metrics.protocols import jsonable, score
from hafloc.metrics.recall import panorama_nms, recall_at_n


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_ranking(db: np.ndarray, q: np.ndarray) -> np.ndarray:
    d = ((q[:, None, :].astype(np.float64) - db[None, :, :]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")


def brute_ap(ranking, positives, junk=()) -> float:
    """AP from its definition: walk the junk-free ranking, average the precision just before and
    just after each positive (trapezoid), weighted by 1/#positives."""
    ranked = [r for r in ranking if r not in set(junk) or r in set(positives)]
    ap, found = 0.0, 0
    for i, r in enumerate(ranked):
        if r in set(positives):
            before = 1.0 if i == 0 else found / i
            found += 1
            ap += (before + found / (i + 1)) / 2 / len(positives)
    return ap


# ---------------------------------------------------------------- AP
def test_compute_ap_hand_worked():
    # positives at ranks 0 and 2 of 2 -> ((1+1)/2 + (1/2+2/3)/2) / 2
    assert compute_ap(np.array([0, 2]), 2) == pytest.approx((1.0 + (0.5 + 2 / 3) / 2) / 2)
    # a single positive at rank 1 -> (0 + 1/2)/2
    assert compute_ap(np.array([1]), 1) == pytest.approx(0.25)
    # junk ranked first is removed: ranking [junk, pos] == ranking [pos]
    assert average_precision(np.array([5, 3, 1]), np.array([3]), np.array([5])) == pytest.approx(1.0)
    # a positive missing from a truncated ranking still counts in the denominator
    assert average_precision(np.array([3, 9]), np.array([3, 4])) == pytest.approx(0.5)


def test_map_matches_brute_force():
    rng = np.random.default_rng(1)
    n_db, n_q = 60, 12
    db, q = unit(rng.normal(size=(n_db, 8))), unit(rng.normal(size=(n_q, 8)))
    positives = [rng.choice(n_db, rng.integers(1, 8), replace=False) for _ in range(n_q)]
    junk = [np.setdiff1d(rng.choice(n_db, 5, replace=False), p) for p in positives]
    ranking = brute_ranking(db, q)
    ref = np.mean(
        [brute_ap(ranking[i].tolist(), p.tolist(), j.tolist()) for i, (p, j) in enumerate(zip(positives, junk))]
    )
    got = mean_average_precision(ranking, positives, junk)["mAP"]
    assert got == pytest.approx(100 * ref)
    # through score() with faiss ranking, Oxford-style dataset
    ds = Dataset(
        "ox",
        "oxford",
        Path("/x"),
        [f"{i}" for i in range(n_db)],
        [f"q{i}" for i in range(n_q)],
        positives=positives,
        junk=junk,
        metric="map",
        pos_threshold=0,
    )
    assert score(ds, db, q)["mAP"] == pytest.approx(100 * ref, rel=1e-6)


def test_revisited_easy_medium_hard_hand_worked():
    ranking = np.array([[4, 0, 2, 1, 3]])
    easy, hard, junk = [np.array([0])], [np.array([2, 3])], [np.array([4])]
    r = revisited_map(ranking, easy, hard, junk)
    # E: junk {4,2,3} removed -> [0,1]: easy 0 at rank 0 -> AP 1
    assert r["E"]["mAP"] == pytest.approx(100.0) and r["E"]["mP@1"] == pytest.approx(100.0)
    # M: junk {4} -> [0,2,1,3]: positives 0,2,3 at ranks 0,1,3
    assert r["M"]["mAP"] == pytest.approx(100 * brute_ap([0, 2, 1, 3], [0, 2, 3]))
    # H: junk {4,0} -> [2,1,3]: hard at 0 and 2
    assert r["H"]["mAP"] == pytest.approx(100 * compute_ap(np.array([0, 2]), 2))
    # revisitop mP@k: precision at min(k, last positive rank): M, k=5 -> 3 of 4
    assert r["M"]["mP@5"] == pytest.approx(75.0) and r["M"]["mP@1"] == pytest.approx(100.0)
    # a query without hard positives is skipped in H
    r2 = revisited_map(np.vstack([ranking, ranking]), easy * 2, [hard[0], np.array([], int)], junk * 2)
    assert r2["H"]["num_evaluated"] == 1 and r2["H"]["mAP"] == pytest.approx(r["H"]["mAP"])


def test_holidays_query_itself_ignored():
    # db 0 is the query image itself (junk), its group has db 1, 2
    db = unit(np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0.5, 0.5, 0.7]]))
    q = db[:1].copy()
    ds = Dataset(
        "h",
        "holidays",
        Path("/x"),
        ["100000", "100001", "100002", "200000"],
        ["100000"],
        positives=[[1, 2]],
        junk=[[0]],
        metric="holidays",
        pos_threshold=0,
    )
    res = score(ds, db, q)
    # ranking [0(self), 1, 3, 2] -> without self [1, 3, 2]: positives at 0 and 2
    assert res["mAP"] == pytest.approx(100 * compute_ap(np.array([0, 2]), 2))
    assert "query itself ignored" in res["protocol"]


# ---------------------------------------------------------------- recall@N
def test_recall_matches_brute_force_utm():
    rng = np.random.default_rng(2)
    n_db, n_q = 300, 40
    db_utm = rng.uniform(0, 400, (n_db, 2))
    q_utm = np.vstack([rng.uniform(0, 400, (n_q - 3, 2)), [[5000, 5000]] * 3])  # 3 queries far from everything
    db, q = unit(rng.normal(size=(n_db, 16))), unit(rng.normal(size=(n_q, 16)))
    ds = Dataset(
        "u",
        "at",
        Path("/x"),
        [str(i) for i in range(n_db)],
        [str(i) for i in range(n_q)],
        db_utm=db_utm,
        q_utm=q_utm,
        pos_threshold=25.0,
    )
    res = score(ds, db, q, ns=(1, 5, 10, 20))
    ranking = brute_ranking(db, q)
    dist = np.sqrt(((q_utm[:, None] - db_utm[None]) ** 2).sum(-1))
    for n in (1, 5, 10, 20):
        hits = sum(any(dist[i, j] <= 25 for j in ranking[i, :n]) for i in range(n_q))
        assert res[f"recall@{n}"] == pytest.approx(100 * hits / n_q)
    assert res["num_queries_without_positive"] == sum(not (dist[i] <= 25).any() for i in range(n_q)) >= 3
    assert res["recall_curve"]["n"] == list(range(1, 26))
    assert res["recall_curve"]["recall"][4] == res["recall@5"]
    assert np.all(np.diff(res["recall_curve"]["recall"]) >= 0)
    np.testing.assert_array_equal(res["_ranks"][:, :10], ranking[:, :10])
    assert "_ranks" not in jsonable(res) and "25 m" in res["protocol"]


def test_recall_hand_worked_and_labels():
    ranks = np.array([[3, 1, 2], [0, 2, 1], [2, 2, 2]])
    positives = [np.array([1]), np.array([9]), np.array([], int)]
    assert recall_at_n(ranks, positives, (1, 2, 3)) == {1: 0.0, 2: pytest.approx(100 / 3), 3: pytest.approx(100 / 3)}
    rng = np.random.default_rng(3)
    db_lab, q_lab = rng.integers(0, 4, 50), rng.integers(0, 4, 10)
    db, q = unit(rng.normal(size=(50, 8))), unit(rng.normal(size=(10, 8)))
    ds = Dataset(
        "l",
        "labels",
        Path("/x"),
        [str(i) for i in range(50)],
        [str(i) for i in range(10)],
        db_labels=db_lab,
        q_labels=q_lab,
    )
    res = score(ds, db, q)
    ranking = brute_ranking(db, q)
    for n in (1, 5, 10):
        assert res[f"recall@{n}"] == pytest.approx(
            100 * np.mean([(db_lab[ranking[i, :n]] == q_lab[i]).any() for i in range(10)])
        )
    ref_map = np.mean([brute_ap(ranking[i].tolist(), np.flatnonzero(db_lab == q_lab[i]).tolist()) for i in range(10)])
    assert res["mAP"] == pytest.approx(100 * ref_map)


# ---------------------------------------------------------------- Tokyo 24/7 NMS, TokyoTM exclusion
def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (90, 90, 200)).save(path)


def _cells(names):
    a = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        a[i, 0] = n
    return a


def test_tokyo247_panorama_nms(tmp_path):
    """Three panoramas x 12 cutouts; the query's 12 most similar images are all cutouts of one wrong
    panorama, the right panorama comes 13th. Without NMS R@5 misses; with NMS it is rank 2."""
    panos = [
        ("00001/381000.000_3946000.000", "WRONG", (381000.0, 3946000.0)),
        ("00002/381500.000_3946000.000", "RIGHT", (381500.0, 3946000.0)),
        ("00003/382000.000_3946000.000", "OTHER", (382000.0, 3946000.0)),
    ]
    db_names, utm = [], []
    for folder, pid, pos in panos:
        for yaw in range(0, 360, 30):
            db_names.append(f"{folder}/{pid}_012_{yaw:03d}.jpg")
            utm.append(pos)
            _img(tmp_path / Path(db_names[-1]).with_suffix(".png"))
    q_names = ["247query_subset_v2/00001.jpg", "247query_subset_v2/00002.jpg"]
    for n in q_names:
        _img(tmp_path / n)
    scipy.io.savemat(
        str(tmp_path / "tokyo247.mat"),
        {
            "dbStruct": {
                "whichSet": "test",
                "dbImageFns": _cells(db_names),
                "utmDb": np.array(utm).T,
                "qImageFns": _cells(q_names),
                "utmQ": np.array([[381505.0, 3946003.0], [382001.0, 3946000.0]]).T,
                "numImages": len(db_names),
                "numQueries": 2,
                "posDistThr": 25,
                "posDistSqThr": 625,
                "nonTrivPosDistSqThr": 100,
            }
        },
    )
    ds = load_dataset(tmp_path / "tokyo247.mat")
    assert len(set(ds.quirks.tokyo_nms)) == 3 and all(p.is_file() for p in ds.db_paths())
    # similarity = decreasing with index inside a designed order: WRONG(12) > RIGHT(12) > OTHER(12) for q0
    order0 = list(range(12)) + list(range(12, 24)) + list(range(24, 36))
    order1 = list(range(24, 36)) + list(range(0, 24))  # q1's own panorama first
    dim = 36
    db = np.eye(dim, dtype=np.float32)
    q = np.zeros((2, dim), np.float32)
    for qi, order in enumerate((order0, order1)):
        q[qi, order] = np.linspace(1.0, 0.1, dim)
    q = unit(q)
    res = score(ds, db, q, ns=(1, 2, 5))
    assert res["recall@1"] == 50.0 and res["recall@2"] == 100.0 and res["recall@5"] == 100.0
    # NMS ranks: one cutout per panorama, best first
    assert res["_ranks"][0, :3].tolist() == [0, 12, 24] and res["_ranks"][1, :3].tolist() == [24, 0, 12]
    assert "panorama NMS" in res["protocol"]
    ds.quirks.tokyo_nms = None
    no_nms = score(ds, db, q, ns=(1, 5, 13))
    assert no_nms["recall@5"] == 50.0 and no_nms["recall@13"] == 100.0


def test_panorama_nms_matches_brute_force():
    rng = np.random.default_rng(5)
    pano = rng.integers(0, 30, 200)
    ranks = np.stack([rng.permutation(200) for _ in range(15)])
    out = panorama_nms(ranks, pano, 10)
    for row, got in zip(ranks, out):
        seen, ref = set(), []
        for r in row:
            if pano[r] not in seen:
                seen.add(pano[r])
                ref.append(r)
        assert got.tolist() == ref[:10]


def test_tokyotm_same_timestamp_excluded(tmp_path):
    """TokyoTM-val: the query's nearest database images are from its own capture date; they must
    be dropped (from rankings and positives) before scoring."""
    n = 6
    db_names = [f"db/{i}.jpg" for i in range(n)]
    db_ts = np.array([2012, 2012, 2009, 2009, 2009, 2012])
    db_utm = np.array([[0, 0], [0, 5], [0, 10], [500, 0], [900, 0], [0, 2]], float) + [380000, 3940000]
    q_utm = np.array([[0, 1]], float) + [380000, 3940000]
    scipy.io.savemat(
        str(tmp_path / "tokyoTM_val.mat"),
        {
            "dbStruct": {
                "whichSet": "val",
                "dbImageFns": _cells(db_names),
                "utmDb": db_utm.T,
                "dbTimeStamp": db_ts[None],
                "qImageFns": _cells(["q/0.jpg"]),
                "utmQ": q_utm.T,
                "qTimeStamp": np.array([[2012]]),
                "numImages": n,
                "numQueries": 1,
                "posDistThr": 25,
                "posDistSqThr": 625,
                "nonTrivPosDistSqThr": 100,
            }
        },
    )
    ds = load_dataset(tmp_path / "tokyoTM_val.mat")
    assert ds.quirks.tokyo_nms is None  # timestamps present -> TokyoTM, no NMS
    db = unit(np.eye(n) + 0.01)
    q = np.zeros((1, n), np.float32)
    q[0, [0, 1, 5, 3, 4, 2]] = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]  # same-date positives first, then negatives
    res = score(ds, db, unit(q), ns=(1, 2, 3))
    # after exclusion the ranking is [3, 4, 2]: only db 2 (2009, 10 m away) is a positive, at rank 3
    assert res["_ranks"][0, :3].tolist() == [3, 4, 2]
    assert (res["recall@1"], res["recall@2"], res["recall@3"]) == (0.0, 0.0, 100.0)
    assert "timestamp excluded" in res["protocol"]
    ds.quirks.timestamps = None
    assert score(ds, db, unit(q), ns=(1,))["recall@1"] == 100.0  # without the rule it is trivially found


def test_score_rejects_mismatched_descriptors():
    ds = Dataset("s", "at", Path("/x"), ["a", "b"], ["q"], db_utm=np.zeros((2, 2)), q_utm=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="got 3 db / 1 query descriptors"):
        score(ds, np.ones((3, 4)), np.ones((1, 4)))


def test_score_real_corridor_ground_truth_with_oracle(shared_data):
    """VPR-Bench corridor: descriptors = one-hot of a position along the corridor (query i and
    ref i are the same place) give recall 100; random descriptors give a recall matching brute force."""
    ds = load_dataset(shared_data / "vprbench/datasets/corridor")
    db = unit(np.eye(111) + 1e-3)
    res = score(ds, db, db.copy())
    assert res["recall@1"] == 100.0 and res["num_queries"] == 111
    rng = np.random.default_rng(0)
    db, q = unit(rng.normal(size=(111, 4))), unit(rng.normal(size=(111, 4)))
    res = score(ds, db, q)
    ranking = brute_ranking(db, q)
    ref = np.mean([np.isin(ranking[i, :5], ds.positives[i]).any() for i in range(111)])
    assert res["recall@5"] == pytest.approx(100 * ref)

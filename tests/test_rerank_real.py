"""The default re-ranking (xfeat + mutual nearest neighbours, the shipped learned scorer) on real
photos: GardensPoint/SFU triplets (view i0 of 10 places against views i1 + i2), which the scorer
was never fitted on, and Lund (every photo against the 28 others, right = within 25 m by EXIF GPS),
one of its fitting sets (its leave-one-set-out numbers are in BENCHMARKS.md).

Strong verified evidence must change wrong answers (the triplets' target: 8/10 at K = 10 and 20,
global 6/10), and re-ranking more candidates must never score below global retrieval (K = 5, 10,
20, 50). The global model is an untrained HAF with clusters fitted on each database, as in
``benchmarks/rerank.py`` and ``benchmarks/verification.py``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from hafloc.cli import main
from hafloc.datasets.geo import haversine_m
from hafloc.descriptors.extract import Extractor
from hafloc.descriptors.modelfile import load_model
from hafloc.images.gps import read_gps
from hafloc.index.rerank import Candidates, LearnedRule, Reranker, top1_right, verified_evidence
from layouts import even

LOCAL_CONF = {"max_side": 640, "max_keypoints": 1024}
KS = (5, 10, 20, 50)


@pytest.fixture(scope="module")
def reranker() -> Reranker:
    return Reranker("xfeat", LOCAL_CONF)


def _candidates(q: list[Path], db: list[Path], right, hidden, model_out: Path, reranker: Reranker) -> list[Candidates]:
    """Every query's global top 50 (all of a small database), verified, in global order."""
    imgs = [str(p) for p in even(db, 40)]
    init = ["model", "init", "--method", "haf", "--images", *imgs, "--output", str(model_out), "--max-side", "480"]
    assert main(init) == 0
    ex = Extractor(load_model(model_out), backend="torch")
    qd = ex.extract_paths(list(q), progress=False).descriptors
    dd = qd if q == db else ex.extract_paths(list(db), progress=False).descriptors
    sims = np.asarray(qd, np.float64) @ np.asarray(dd, np.float64).T
    feats = {p: reranker.features_path(p) for p in {*q, *db}}
    out = []
    for i in range(len(q)):
        cands = [j for j in np.argsort(-sims[i], kind="stable") if not hidden(i, j)][:50]
        ver = reranker.verify(feats[q[i]], [feats[db[j]] for j in cands])
        ev = verified_evidence(ver)
        out.append(
            Candidates(
                sims[i, cands],
                np.array([v.inliers for v in ver], np.float64),
                ev["matches"],
                ev["spread"],
                ev["homography"],
                np.array([right(i, j) for j in cands], bool),
            )
        )
    return out


@pytest.fixture(scope="module")
def triplets(shared_data, tmp_path_factory, reranker) -> list[Candidates]:
    root = shared_data / "gardenspoint_mini"
    with open(root / "nicktrinh_triplets_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    q = [r for r in rows if r["view"] == "i0"]
    db = [r for r in rows if r["view"] != "i0"]
    return _candidates(
        [root / r["image"] for r in q],
        [root / r["image"] for r in db],
        lambda i, j: q[i]["place"] == db[j]["place"],
        lambda i, j: False,
        tmp_path_factory.mktemp("triplets") / "haf.model",
        reranker,
    )


@pytest.fixture(scope="module")
def lund(shared_data, tmp_path_factory, reranker) -> list[Candidates]:
    paths = sorted((shared_data / "lund_gps" / "images").glob("*.jpg"))
    gps = [read_gps(p) for p in paths]
    assert all(g is not None for g in gps)
    d = np.array([[haversine_m(a[0], a[1], b[0], b[1]) for b in gps] for a in gps])  # type: ignore[index]
    return _candidates(
        paths,
        paths,
        lambda i, j: bool(d[i, j] <= 25.0),
        lambda i, j: i == j,
        tmp_path_factory.mktemp("lund") / "haf.model",
        reranker,
    )


def test_default_rule_is_the_shipped_scorer(reranker):
    assert isinstance(reranker.rule, LearnedRule)
    assert reranker.matcher.name == "mnn"  # the best ROC AUC on the shared sets (benchmarks/verification.py)


def test_triplets_strong_verified_evidence_changes_wrong_answers(triplets, reranker):
    glob = sum(bool(q.right[0]) for q in triplets)
    got = {k: int(top1_right(reranker.rule, triplets, k).sum()) for k in KS}
    print(f"\ntriplets: global {glob}/10, re-ranked {got}")
    assert got[10] >= 8 and got[20] >= 8, (glob, got)
    assert all(v >= glob for v in got.values()), (glob, got)


@pytest.mark.parametrize("which", ["triplets", "lund"])
def test_reranking_never_below_global_at_any_k(which, request, reranker):
    queries = request.getfixturevalue(which)
    glob = sum(bool(q.right[0]) for q in queries)
    got = {k: int(top1_right(reranker.rule, queries, k).sum()) for k in KS}
    print(f"\n{which}: global {glob}/{len(queries)}, re-ranked {got}")
    assert all(v >= glob for v in got.values()), (glob, got)


def test_verified_answers_are_right(triplets, lund, reranker):
    """'verified' is a promise: on these sets every answer above the scorer's threshold is right."""
    rule = reranker.rule
    n_verified = 0
    for q in [*triplets, *lund]:
        c = q.head(10)
        p = rule.probabilities(c.similarities, c.inliers, **c.evidence())
        top = int(np.argsort(-p, kind="stable")[0])
        if p[top] >= rule.p_verified:
            n_verified += 1
            assert c.right[top]
    assert n_verified >= 5

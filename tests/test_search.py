"""Scalable search: IVF-PQ (+ exact re-ranking) and HNSW against exact search."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from hafloc.index.search import (
    SearchConfig,
    build_search_index,
    knn,
    load_search_index,
    resolve_params,
    save_search_index,
    search,
)


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors around random unit centres: a stand-in for real descriptor clouds."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + spread / np.sqrt(dim) * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def perturbed(db: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = db[rng.choice(len(db), n, replace=False)] + noise / np.sqrt(db.shape[1]) * rng.standard_normal(
        (n, db.shape[1])
    ).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    db = clustered(20_000, 64, 200, spread=1.0, seed=0)
    # noise as large as a cluster's spread: the exact neighbour is often not the source vector,
    # and PQ codes alone get the top-1 wrong for some queries
    q = perturbed(db, 400, noise=1.0, seed=1)
    return db, q, knn(db, q, 10)


@pytest.fixture(scope="module")
def ivfpq(data):
    return build_search_index(data[0], SearchConfig(kind="ivfpq"))


def test_ivfpq_top1_agrees_with_exact(data, ivfpq):
    db, q, (esims, eids) = data
    assert ivfpq.kind == "ivfpq" and ivfpq.params["nlist"] == 512 and 64 % ivfpq.params["m"] == 0
    assert isinstance(ivfpq.index, faiss.IndexRefineFlat)
    sims, ids = search(ivfpq, q, 10)
    agree = float((ids[:, 0] == eids[:, 0]).mean())
    assert agree >= 0.95, agree
    # re-ranked similarities are exact cosines, not PQ approximations
    hit = ids[:, 0] == eids[:, 0]
    np.testing.assert_allclose(sims[hit, 0], esims[hit, 0], atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)


def test_pq_alone_is_worse_so_the_test_can_tell(data, ivfpq):
    """Without the exact re-ranking the codes lose neighbours: the agreement test is not vacuous."""
    db, q, (_, eids) = data
    base = faiss.downcast_index(ivfpq.index.base_index)
    pq_agree = float((base.search(q, 1)[1][:, 0] == eids[:, 0]).mean())
    refined_agree = float((search(ivfpq, q, 1)[1][:, 0] == eids[:, 0]).mean())
    assert pq_agree < refined_agree and pq_agree < 0.97


def test_save_load_roundtrip(data, ivfpq, tmp_path):
    _, q, _ = data
    path = tmp_path / "s.faiss"
    save_search_index(ivfpq, path)
    params = json.loads((tmp_path / "s.faiss.json").read_text())
    assert params["kind"] == "ivfpq" and params["n"] == 20_000 and params["nprobe"] == ivfpq.params["nprobe"]
    loaded = load_search_index(path)
    assert faiss.extract_index_ivf(loaded.index).nprobe == params["nprobe"]
    a, b = search(ivfpq, q[:50], 5), search(loaded, q[:50], 5)
    np.testing.assert_array_equal(a[1], b[1])


def test_hnsw_and_flat(data):
    db, q, (esims, eids) = data
    sub = db[:5000]
    esub = knn(sub, q, 1)[1]
    hnsw = build_search_index(sub, SearchConfig(kind="hnsw"))
    assert float((search(hnsw, q, 1)[1][:, 0] == esub[:, 0]).mean()) >= 0.95
    flat = build_search_index(sub, SearchConfig(kind="ivfpq"), exact=True)
    assert flat.kind == "flat"
    np.testing.assert_array_equal(search(flat, q, 1)[1], esub)


def test_auto_choice_and_fallback():
    cfg = SearchConfig()
    assert resolve_params(100_000, 256, cfg)["kind"] == "flat"
    p = resolve_params(1_000_000, 256, cfg)  # above the threshold: IVF-PQ on disk, cells capped
    assert (p["kind"], p["nlist"], p["m"], p["nprobe"]) == ("ondisk", 1024, 32, 16)
    p = resolve_params(1_000_000, 256, SearchConfig(kind="ivfpq"))
    assert (p["kind"], p["nlist"], p["m"]) == ("ivfpq", 4000, 32)
    assert resolve_params(500, 64, SearchConfig(kind="ivfpq"))["kind"] == "flat"  # too few to train
    with pytest.raises(ValueError):
        resolve_params(1_000_000, 256, SearchConfig(kind="ivfpq", m=48))
    with pytest.raises(ValueError):
        SearchConfig(kind="lsh")


def test_k_larger_than_database():
    db = clustered(7, 16, 2, 0.5, 3)
    sims, ids = search(build_search_index(db), db[:2], 50)
    assert ids.shape == (2, 7) and set(ids[0]) == set(range(7))
    assert ids[0, 0] == 0 and sims[0, 0] == pytest.approx(1.0, abs=1e-6)

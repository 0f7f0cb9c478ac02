"""hloc interop: global-descriptor HDF5 layout and retrieval pairs file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from hafloc.errors import InputError
from hafloc.index.hloc_export import (
    list_h5_names,
    read_global_descriptors,
    retrieval_pairs,
    write_global_descriptors,
    write_pairs,
)


def test_h5_layout_nested_groups(tmp_path):
    names = ["db/a/0001.jpg", "db/a/0002.jpg", "query/q1.jpg"]
    desc = np.eye(3, 8, dtype=np.float32)
    path = tmp_path / "global-feats.h5"
    write_global_descriptors(path, names, desc)
    with h5py.File(path, "r") as fd:
        assert set(fd.keys()) == {"db", "query"}
        assert isinstance(fd["db"]["a"], h5py.Group)
        ds = fd["db/a/0002.jpg/global_descriptor"]
        assert isinstance(ds, h5py.Dataset) and ds.shape == (8,) and ds.dtype == np.float32
        np.testing.assert_array_equal(ds[()], desc[1])
        # hloc's own name listing: parents of datasets
        found = []
        fd.visititems(lambda _, o: found.append(o.parent.name.strip("/")) if isinstance(o, h5py.Dataset) else None)
    assert sorted(set(found)) == sorted(names) == sorted(list_h5_names(path))
    got_names, got = read_global_descriptors(path, names)
    np.testing.assert_array_equal(got, desc)
    write_global_descriptors(path, names, desc, as_half=True)
    with h5py.File(path, "r") as fd:
        assert fd["query/q1.jpg/global_descriptor"].dtype == np.float16
    with pytest.raises(InputError, match="no global_descriptor"):
        read_global_descriptors(path, ["db/missing.jpg"])


def test_pairs_file_exact(tmp_path):
    db_names = ["db/0.jpg", "db/1.jpg", "db/2.jpg"]
    db = np.array([[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0]], np.float32)
    q = np.array([[0.9, 0.1, 0], [0, 0.2, 0.9]], np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    pairs = retrieval_pairs(["q/a.jpg", "q/b.jpg"], q, db_names, db, k=2)
    path = tmp_path / "pairs-top2.txt"
    write_pairs(path, pairs)
    assert path.read_text() == "q/a.jpg db/0.jpg\nq/a.jpg db/2.jpg\nq/b.jpg db/1.jpg\nq/b.jpg db/2.jpg"


def test_pairs_exclude_self_when_query_set_is_database():
    names = ["a.jpg", "b.jpg", "c.jpg"]
    x = np.array([[1, 0], [0.9, 0.436], [0, 1]], np.float32)
    pairs = retrieval_pairs(names, x, names, x, k=1)
    assert pairs == [("a.jpg", "b.jpg"), ("b.jpg", "a.jpg"), ("c.jpg", "b.jpg")]
    with pytest.raises(ValueError, match="space"):
        write_pairs("/nonexistent/never-written.txt", [("a b.jpg", "c.jpg")])


def _hloc_rule(query_names, q, db_names, db, k):
    """hloc's pairs_from_retrieval selection, restated: self pairs and similarity < 0 (min_score=0)
    are invalid (-inf), top-k by score, only finite scores kept, best first per query."""
    sim = q.astype(np.float64) @ db.astype(np.float64).T
    invalid = (np.array(query_names)[:, None] == np.array(db_names)[None]) | (sim < 0)
    sim = np.where(invalid, -np.inf, sim)
    pairs = []
    for i, row in enumerate(sim):
        for j in np.argsort(-row, kind="stable")[:k]:
            if np.isfinite(row[j]):
                pairs.append((query_names[i], db_names[j]))
    return pairs


def test_pairs_follow_hloc_on_a_whitened_model(shared_data):
    """PCA whitening centres the descriptors, so dissimilar photos score below 0: hloc drops those."""
    from hafloc.descriptors.extract import Extractor
    from hafloc.descriptors.fit import fit_whitening
    from hafloc.descriptors.network import GeoLocNet, ModelConfig

    photos = sorted((shared_data / "landmarks_mini" / "images").glob("*.jpg"))
    model = GeoLocNet(ModelConfig.for_method("gem"), pretrained=True).eval()
    model.config.max_side = 160
    fit_whitening(model, photos, dim=16, progress=False)
    res = Extractor(model, batch_size=8, max_side=160).extract_paths(photos, progress=False)
    desc, names = res.descriptors, [p.name for p in photos]
    db_names, db, q_names, q = names[::2], desc[::2], names[1::2], desc[1::2]
    k = 8
    kept_all = retrieval_pairs(q_names, q, db_names, db, k, min_score=None)
    assert len(kept_all) == k * len(q_names)
    sims = {(a, b): float(x @ y) for a, x in zip(q_names, q) for b, y in zip(db_names, db)}
    assert sum(sims[p] < 0 for p in kept_all) >= 5  # the case exists: negative candidates in the top-k
    ours = retrieval_pairs(q_names, q, db_names, db, k)
    assert ours == _hloc_rule(q_names, q, db_names, db, k) and len(ours) < len(kept_all)
    assert all(sims[p] >= 0 for p in ours)
    # the query set is the database: no self pairs either, as in hloc
    assert retrieval_pairs(names, desc, names, desc, k) == _hloc_rule(names, desc, names, desc, k)


def test_export_hloc_has_keep_negative_flag():
    from hafloc.cli import build_parser

    argv = ["index", "export-hloc", "--index", "i", "--queries", "q", "--output", "o"]
    assert build_parser().parse_args(argv).keep_negative is False
    assert build_parser().parse_args(argv + ["--keep-negative"]).keep_negative is True

"""hloc interop: global-descriptor HDF5 layout and retrieval pairs file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from hafloc.errors import InputError
from hafloc.index.hloc_export import (list_h5_names, read_global_descriptors, retrieval_pairs,
                                      write_global_descriptors, write_pairs)


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

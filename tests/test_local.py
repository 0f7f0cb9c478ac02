"""Local features: real-photo matching, homography recovery, degenerate inputs, hloc's HDF5 layout."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from PIL import Image

from hafloc.errors import HaflocError, InputError
from hafloc.local import (
    EXTRACTORS,
    MATCHERS,
    LocalFeatures,
    MatchResult,
    create_extractor,
    create_matcher,
    list_feature_names,
    names_to_pair,
    read_local_features,
    read_matches,
    verify,
    write_local_features,
    write_matches,
)


@pytest.fixture(scope="module")
def xfeat():
    return create_extractor("xfeat")  # the default conf: 640 px, 1024 keypoints


@pytest.fixture(scope="module")
def lighterglue():
    return create_matcher("lighterglue")


@pytest.fixture(scope="module")
def triplets(shared_data):
    """place -> its three views (GardensPoint day/night and SFU-Mountain seasons)."""
    root = shared_data / "gardenspoint_mini"
    places: dict[str, list[Path]] = {}
    with open(root / "nicktrinh_triplets_labels.csv") as f:
        for row in csv.DictReader(f):
            places.setdefault(row["place"], []).append(root / row["image"])
    return places


def inliers(f0: LocalFeatures, f1: LocalFeatures, matcher) -> int:
    return verify(f0.keypoints, f1.keypoints, matcher.match(f0, f1).matches).inliers


def test_same_place_many_inliers_other_place_few(triplets, xfeat, lighterglue):
    feats = {p: [xfeat.extract_path(v) for v in views] for p, views in triplets.items()}
    places = sorted(feats)
    for i, p in enumerate(places):
        a, b, c = feats[p]
        other = feats[places[(i + 1) % len(places)]]
        same = max(inliers(a, b, lighterglue), inliers(b, c, lighterglue))
        diff = inliers(b, other[2], lighterglue)
        assert same >= 30 and same >= 2 * diff, (p, same, diff)


def test_same_building_nearby_viewpoints_beat_another_place(shared_data, xfeat, lighterglue, triplets):
    lund = shared_data / "lund_gps" / "images"
    f1, f2 = xfeat.extract_path(lund / "01.jpg"), xfeat.extract_path(lund / "02.jpg")
    elsewhere = xfeat.extract_path(triplets["p0"][0])
    assert f1.image_size == (1024, 768) and len(f1) == 1024
    # keypoints are in original pixels, not the 640 px network input
    assert f1.keypoints[:, 0].max() > 700 and f1.keypoints.min() >= -0.5
    same = inliers(f1, f2, lighterglue)
    assert same >= 100 and same > 5 * inliers(f1, elsewhere, lighterglue)


@pytest.fixture(scope="module")
def warped(shared_data):
    img = Image.open(shared_data / "lund_gps" / "images" / "05.jpg").convert("RGB").resize((640, 480))
    H = np.array([[0.9, 0.12, 30.0], [-0.08, 0.95, 25.0], [1e-4, 5e-5, 1.0]])
    return img, Image.fromarray(cv2.warpPerspective(np.asarray(img), H, (640, 480))), H


@pytest.mark.parametrize("matcher", ["lighterglue", "mnn"])
def test_known_homography_recovered_within_2px(warped, xfeat, matcher):
    img, img_w, H = warped
    f0, f1 = xfeat.extract(img), xfeat.extract(img_w)
    res = create_matcher(matcher, extractor="xfeat").match(f0, f1)
    v = verify(f0.keypoints, f1.keypoints, res.matches)
    assert v.model == "H" and v.inliers > 100 and v.inlier_mask.sum() == v.inliers
    corners = np.array([[[0, 0], [639, 0], [639, 479], [0, 479]]], np.float64)
    err = np.abs(cv2.perspectiveTransform(corners, v.matrix) - cv2.perspectiveTransform(corners, H)).max()
    assert err < 2.0
    again = verify(f0.keypoints, f1.keypoints, res.matches)  # deterministic
    assert again.inliers == v.inliers and np.array_equal(again.inlier_mask, v.inlier_mask)


def test_degenerate_images_give_empty_features(xfeat, lighterglue):
    grey = Image.new("RGB", (640, 480), (128, 128, 128))
    rng = np.random.default_rng(0)
    tiny = Image.fromarray(rng.integers(0, 255, (12, 9, 3), dtype=np.uint8))
    for img in (grey, Image.new("L", (1, 1)), tiny, Image.new("RGBA", (300, 200), (9, 9, 9, 0))):
        f = xfeat.extract(img)
        assert len(f) == 0 and f.descriptors.shape == (0, 64) and f.image_size == img.size
    textured = xfeat.extract(Image.fromarray(rng.integers(0, 255, (240, 320), dtype=np.uint8)))  # grayscale input
    assert len(textured) > 0
    rgb = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
    assert len(xfeat.extract(rgb.convert("CMYK"))) > 0 and len(xfeat.extract(rgb.convert("P"))) > 0
    for a, b in ((f, textured), (textured, f), (f, f)):
        for m in (lighterglue, create_matcher("mnn")):
            r = m.match(a, b)
            assert len(r) == 0 and r.matches.shape == (0, 2)
            assert verify(a.keypoints, b.keypoints, r.matches).inliers == 0
    assert [len(r) for r in lighterglue.match_many(textured, [f, textured])][0] == 0


def test_verify_degenerate_inputs_never_raise():
    rng = np.random.default_rng(1)
    kp = rng.uniform(0, 500, (50, 2))
    for m in range(8):
        v = verify(kp, kp, np.stack([np.arange(m), np.arange(m)], 1))
        assert v.inliers == 0 and v.model is None and v.inlier_mask.shape == (m,)
    same_point = np.tile([[10.0, 20.0]], (40, 1))
    v = verify(same_point, same_point, np.stack([np.arange(40)] * 2, 1))
    assert v.inliers == 0 and not v.inlier_mask.any()
    bad = kp.copy()
    bad[3] = np.nan
    assert verify(bad, kp, np.stack([np.arange(50)] * 2, 1)).inliers == 0
    assert verify(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2), int)).inliers == 0
    # a consistent random set is found whole
    assert verify(kp, kp * 1.3 + 7, np.stack([np.arange(50)] * 2, 1)).inliers == 50


def test_mnn_is_mutual_and_thresholds_filter():
    rng = np.random.default_rng(2)
    d0 = rng.normal(size=(30, 16)).astype(np.float32)
    perm = rng.permutation(30)
    d1 = d0[perm] + 0.01 * rng.normal(size=(30, 16)).astype(np.float32)
    f0 = LocalFeatures(rng.uniform(0, 100, (30, 2)), d0, np.ones(30), (100, 100))
    f1 = LocalFeatures(rng.uniform(0, 100, (30, 2)), d1, np.ones(30), (100, 100))
    r = create_matcher("mnn").match(f0, f1)
    assert len(r) == 30 and np.array_equal(perm[r.matches[:, 1]], r.matches[:, 0])
    assert create_matcher("mnn", distance_threshold=1e-4).match(f0, f1).matches.shape == (0, 2)
    many = create_matcher("mnn").match_many(f0, [f1, LocalFeatures.empty(16, (5, 5)), f0])
    assert [len(x) for x in many] == [30, 0, 30] and np.array_equal(many[0].matches, r.matches)
    with pytest.raises(ValueError, match="unknown option"):
        create_matcher("mnn", ratio=0.8)


def test_registry_and_errors():
    assert set(EXTRACTORS) == {"xfeat", "aliked", "disk", "superpoint"}
    assert set(MATCHERS) == {"lighterglue", "lightglue", "mnn"}
    assert create_extractor.__defaults__ == ("xfeat",)
    assert EXTRACTORS["xfeat"].default_matcher == "lighterglue" and EXTRACTORS["disk"].default_matcher == "lightglue"
    with pytest.raises(HaflocError, match="unknown local features"):
        create_extractor("sift")
    with pytest.raises(ValueError, match="unknown option"):
        create_extractor("xfeat", max_kpts=5)
    with pytest.raises(HaflocError, match="no offline LightGlue weights"):
        create_matcher("lightglue", extractor="superpoint")
    with pytest.raises(HaflocError, match="extractor"):
        create_matcher("lightglue")


def test_extract_path_reports_bad_files(tmp_path, xfeat):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="broken.jpg"):
        xfeat.extract_path(bad)


def test_hloc_feature_and_match_files_layout(tmp_path):
    rng = np.random.default_rng(3)

    def feats(n, d=64):
        return LocalFeatures(rng.uniform(0, 600, (n, 2)), rng.normal(size=(n, d)), rng.uniform(0, 1, n), (640, 480))

    items = {"db/a/0001.jpg": feats(40), "query/q1.jpg": feats(25), "flat.jpg": LocalFeatures.empty(64, (8, 8))}
    path = tmp_path / "features.h5"
    write_local_features(path, dict(list(items.items())[:2]), append=True)  # creates the file
    write_local_features(path, {"flat.jpg": items["flat.jpg"]})  # appends
    with h5py.File(path, "r") as fd:  # what hloc reads
        assert isinstance(fd["db"]["a"], h5py.Group)
        grp = fd["db/a/0001.jpg"]
        assert grp["keypoints"].shape == (40, 2) and grp["keypoints"].dtype == np.float32
        assert grp["descriptors"].shape == (64, 40) and grp["descriptors"].dtype == np.float16
        assert grp["scores"].shape == (40,)
        assert tuple(grp["image_size"][()]) == (640, 480)
        np.testing.assert_allclose(grp["descriptors"][()].T, items["db/a/0001.jpg"].descriptors, atol=2e-3)
        hloc_names = set()
        fd.visititems(lambda _, o: hloc_names.add(o.parent.name.strip("/")) if isinstance(o, h5py.Dataset) else None)
    assert hloc_names == set(items) == set(list_feature_names(path))
    for name, f in items.items():
        back = read_local_features(path, name)
        np.testing.assert_array_equal(back.keypoints, f.keypoints)
        np.testing.assert_allclose(back.descriptors, f.descriptors, atol=2e-3)
        np.testing.assert_allclose(back.scores, f.scores, atol=1e-3)
        assert back.image_size == f.image_size and back.descriptors.shape == f.descriptors.shape
    write_local_features(path, {"query/q1.jpg": feats(7)})  # rewriting a name replaces its group
    assert len(read_local_features(path, "query/q1.jpg")) == 7 and len(read_local_features(path, "db/a/0001.jpg")) == 40
    write_local_features(path, {"only.jpg": feats(3)}, append=False)
    assert list_feature_names(path) == ["only.jpg"]
    with pytest.raises(InputError, match="no local features"):
        read_local_features(path, "db/a/0001.jpg")

    res = MatchResult(np.array([[0, 5], [3, 1], [24, 39]]), np.array([0.9, 0.5, 0.25]))
    m0, s0 = res.to_matches0(25)
    mpath = tmp_path / "matches.h5"
    write_matches(mpath, {("query/q1.jpg", "db/a/0001.jpg"): (m0, s0)})
    key = names_to_pair("query/q1.jpg", "db/a/0001.jpg")
    assert key == "query-q1.jpg/db-a-0001.jpg"
    with h5py.File(mpath, "r") as fd:
        assert fd[key]["matches0"].shape == (25,) and fd[key]["matching_scores0"].dtype == np.float16
        m = fd[key]["matches0"][()]
        assert (m > -1).sum() == 3 and m[3] == 1 and m[1] == -1
    back = read_matches(mpath, "query/q1.jpg", "db/a/0001.jpg")
    np.testing.assert_array_equal(back.matches, res.matches)
    np.testing.assert_allclose(back.scores, res.scores, atol=1e-3)
    flipped = read_matches(mpath, "db/a/0001.jpg", "query/q1.jpg")
    np.testing.assert_array_equal(flipped.matches, res.matches[:, ::-1])


def test_disk_lightglue_same_place_beats_other_place(shared_data, triplets):
    disk = create_extractor("disk", max_keypoints=512, max_side=512)
    lg = create_matcher(disk.default_matcher, extractor="disk")
    lund = shared_data / "lund_gps" / "images"
    a, b = disk.extract_path(lund / "01.jpg"), disk.extract_path(lund / "02.jpg")
    other = disk.extract_path(triplets["p0"][0])
    assert a.descriptors.shape[1] == 128
    assert inliers(a, b, lg) > 3 * max(inliers(a, other, lg), 10)


def test_lightglue_takes_keypoints_on_the_border(lighterglue):
    """hloc's convention puts border keypoints at -0.5 / size - 0.5, which LightGlue's range check refuses raw."""
    rng = np.random.default_rng(4)
    kp = np.concatenate([[[-0.5, -0.5], [99.5, 79.5]], rng.uniform(0, 99, (30, 2))])
    desc = rng.normal(size=(32, 64)).astype(np.float32)
    f = LocalFeatures(kp, desc / np.linalg.norm(desc, axis=1, keepdims=True), np.ones(32), (100, 80))
    r = lighterglue.match(f, f)
    assert len(r) >= 16 and (r.matches[:, 0] == r.matches[:, 1]).all()


def test_concurrent_appends_keep_every_image(tmp_path):
    import threading

    path = tmp_path / "features.h5"
    rng = np.random.default_rng(5)
    chunks = [
        {
            f"t{t}/img{i}.jpg": LocalFeatures(rng.uniform(0, 9, (4, 2)), rng.normal(size=(4, 8)), np.ones(4), (10, 10))
            for i in range(5)
        }
        for t in range(4)
    ]
    threads = [threading.Thread(target=write_local_features, args=(path, c)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(list_feature_names(path)) == sorted(n for c in chunks for n in c)
    assert not [p.name for p in tmp_path.iterdir() if ".partial" in p.name]


def test_aliked_loads_wheel_weights_without_torchvision(shared_data):
    import sys

    aliked = create_extractor("aliked", max_side=320, max_keypoints=256)
    f = aliked.extract_path(shared_data / "lund_gps" / "images" / "01.jpg")
    assert 50 <= len(f) <= 256 and f.descriptors.shape[1] == 128 and f.image_size == (1024, 768)
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1, atol=1e-4)
    assert "torchvision" not in sys.modules and aliked.default_matcher == "lightglue"

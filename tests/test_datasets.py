"""Dataset readers against the real ground-truth files and fixtures in the published layouts."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from hafloc.datasets.atfolders import parse_at_name
from hafloc.datasets.base import Dataset, Quirks, split_database
from hafloc.datasets.dbstruct import load_dbstruct
from hafloc.datasets.detect import FORMATS, detect_format, load_dataset
from hafloc.datasets.geo import haversine_m, latlon_to_utm, utm_to_latlon
from hafloc.datasets.holidays import holidays_from_names
from hafloc.errors import InputError
from hafloc.images.gps import read_gps

GT = "ground_truth"


def brute_positives(db_utm: np.ndarray, q_utm: np.ndarray, thr: float) -> list[np.ndarray]:
    d = np.sqrt(((q_utm[:, None, :] - db_utm[None, :, :]) ** 2).sum(-1))
    return [np.flatnonzero(row <= thr) for row in d]


# ---------------------------------------------------------------- real dbStruct files
DBSTRUCT = {
    # file: (num_db, num_q, threshold, northing_first, index_coordinates)
    "heaputil_dbstruct/berlin.mat": (314, 280, 50, False, False),
    "heaputil_dbstruct/oxford.mat": (213, 251, 45, True, False),
    "heaputil_dbstruct/nordland.mat": (1000, 467, 5, False, True),
    "seqnet_structfiles/structFiles/msls_amman_d-20_d2-5.db": (953, 835, 10, False, False),
    "seqnet_structfiles/structFiles/msls_austin_d-20_d2-5.db": (4927, 1732, 10, False, False),
    "seqnet_structfiles/structFiles/msls_melbourne_d-20_d2-5.db": (4973, 4474, 10, False, False),
    "seqnet_structfiles/structFiles/nordland_test_d-1_d2-1.db": (3000, 3000, 1, False, True),
    "seqnet_structfiles/structFiles/nordland_val_d-1_d2-1.db": (3000, 3000, 1, False, True),
    "seqnet_structfiles/structFiles/nordland_train_d-40_d2-10.db": (15000, 15000, 40, False, True),
    "seqnet_structfiles/structFiles/oxford-pnv_2015-03-17-11-08-44_2014-12-16-18-44-24_test_d-25_d2-5.db": (
        1570,
        1579,
        25,
        True,
        False,
    ),
    "seqnet_structfiles/structFiles/oxford-pnv_2015-03-17-11-08-44_2014-12-16-18-44-24_train_d-20_d2-5.db": (
        3029,
        2971,
        20,
        True,
        False,
    ),
    "seqnet_structfiles/structFiles/oxford-v1.0_2015-03-17-11-08-44_2014-12-16-18-44-24_test_d-10_d2-5.db": (
        1574,
        1576,
        10,
        True,
        False,
    ),
    "seqnet_structfiles/structFiles/oxford-v1.0_2015-03-17-11-08-44_2014-12-16-18-44-24_train_d-20_d2-5.db": (
        2981,
        2931,
        20,
        True,
        False,
    ),
}


def test_every_real_dbstruct_file_is_covered(shared_data):
    found = {
        p.relative_to(shared_data / GT).as_posix() for p in (shared_data / GT).rglob("*") if p.suffix in (".mat", ".db")
    }
    assert found == set(DBSTRUCT)


@pytest.mark.parametrize("rel", sorted(DBSTRUCT))
def test_real_dbstruct(shared_data, rel):
    n_db, n_q, thr, north_first, index_coords = DBSTRUCT[rel]
    ds = load_dataset(shared_data / GT / rel)
    assert (ds.format, ds.num_db, ds.num_q, ds.pos_threshold) == ("dbstruct", n_db, n_q, thr)
    assert bool(ds.quirks.northing_first) == north_first
    assert bool(ds.quirks.index_coordinates) == index_coords
    if not index_coords:  # after the swap, column 0 is always an easting (100-900 km)
        assert np.all((ds.db_utm[:, 0] > 1e5) & (ds.db_utm[:, 0] < 1e6))
    # radius search agrees with a brute-force distance matrix on a sample of queries
    sample = np.arange(0, ds.num_q, max(1, ds.num_q // 40))
    ours = ds.query_positives()
    ref = brute_positives(ds.db_utm, ds.q_utm[sample], ds.pos_threshold)
    for i, r in zip(sample, ref):
        np.testing.assert_array_equal(ours[i], r)


def test_berlin_every_query_has_a_positive(shared_data):
    ds = load_dataset(shared_data / GT / "heaputil_dbstruct/berlin.mat")
    assert ds.db_images[0] == "Reference_resized/Image_(2).jpg"  # MATLAB char padding stripped
    assert all(len(p) for p in ds.query_positives())


# ---------------------------------------------------------------- Patch-NetVLAD .npz + lists
def test_patchnetvlad_pitts30k_and_cross_source_names(shared_data):
    ds = load_dataset(shared_data / GT / "patchnetvlad_gt/dataset_gt_files/pitts30k_test.npz")
    assert (ds.num_db, ds.num_q, ds.pos_threshold) == (10000, 6816, 25)
    # the gsv-cities lists of the same split name the same images in the same order
    d = shared_data / GT / "vpr_gt_npy/datasets/Pittsburgh"
    assert [n.removeprefix("Pittsburgh250k/") for n in ds.db_images] == list(np.load(d / "pitts30k_test_dbImages.npy"))
    assert [n.removeprefix("Pittsburgh250k/") for n in ds.q_images] == list(np.load(d / "pitts30k_test_qImages.npy"))
    # Pittsburgh: the cutouts of a place (same 6-digit id) share one position
    place = np.array([Path(n).name[:6] for n in ds.db_images])
    for pid in np.unique(place)[:50]:
        assert len(np.unique(ds.db_utm[place == pid], axis=0)) == 1


def test_patchnetvlad_tokyo247_panoramas(shared_data):
    ds = load_dataset(shared_data / GT / "patchnetvlad_gt/dataset_gt_files/tokyo247.npz")
    assert (ds.num_db, ds.num_q, ds.pos_threshold) == (75984, 315, 25)
    ids, counts = np.unique(ds.quirks.tokyo_nms, return_counts=True)
    assert len(ids) == 6332 and np.all(counts == 12)  # 12 cutouts per panorama
    # all cutouts of a panorama share one position
    pos_per_pano = {tuple(p) for p in np.c_[np.unique(ds.quirks.tokyo_nms, return_inverse=True)[1], ds.db_utm]}
    assert len({k[0] for k in pos_per_pano}) == len(pos_per_pano)
    pos = ds.query_positives()
    assert sum(len(p) == 0 for p in pos) == 0
    assert ds.quirks.q_conditions[:3] == ["day", "sunset", "night"] and ds.q_images[0].endswith("00010.jpg")
    assert ds.quirks.q_conditions.count("night") == 105


def test_patchnetvlad_nordland(shared_data):
    ds = load_dataset(shared_data / GT / "patchnetvlad_gt/dataset_gt_files/nordland.npz")
    assert (ds.num_db, ds.num_q, ds.pos_threshold) == (27592, 27592, 10)


# ---------------------------------------------------------------- VPR-Bench / gsv .npy
VPRBENCH = {
    "17places": (408, 406),
    "CrossSeason_CoHOG_Dataset": (191, 191),
    "ESSEX3IN1_dataset": (210, 210),
    "GardensPointWalking": (202, 200),
    "GardensPoint_TN": (200, 400),
    "Living": (32, 32),
    "Nordland": (27592, 2760),
    "Pittsburgh": (23000, 1000),
    "SPEDTEST": (607, 607),
    "Synthia-NightToFall": (911, 813),
    "Tokyo247": (4104, 315),
    "corridor": (111, 111),
    "inria_holidays": (512, 300),
}


@pytest.mark.parametrize("name", sorted(VPRBENCH))
def test_vprbench_ground_truth(shared_data, name):
    ds = load_dataset(shared_data / "vprbench/datasets" / name)
    assert ds.format == "vprbench" and (ds.num_db, ds.num_q) == VPRBENCH[name]
    raw = np.load(shared_data / "vprbench/datasets" / name / "ground_truth_new.npy", allow_pickle=True)
    for (qi, refs), pos in zip(raw, ds.positives):
        assert list(pos) == [r for r in refs if r >= 0]
    assert ds.quirks.true_negative_queries == (200 if name == "GardensPoint_TN" else 0)


def test_vprbench_corridor_images(shared_data):
    ds = load_dataset(shared_data / "vprbench/datasets/corridor")
    assert (ds.num_db, ds.num_q) == (111, 111) and not ds.quirks.images_missing
    assert ds.q_images[5] == "query/0000005.jpg" and all(p.is_file() for p in ds.db_paths())


def test_vprbench_inconsistent_folder_is_a_clear_error(shared_data):
    # 'oneimage' ships 1 query image for 10 ground-truth rows
    with pytest.raises(InputError, match="query index 9 but only 1 images"):
        load_dataset(shared_data / "vprbench/datasets/oneimage")


GSV = {
    "CrossSeason/CrossSeason_gt.npy": (191, 191),
    "ESSEX/ESSEX_gt.npy": (210, 210),
    "InriaHolidays/Inria_gt.npy": (512, 300),
    "Nordland/Nordland_gt.npy": (27592, 2760),
    "SPED/SPED_gt.npy": (607, 607),
}


@pytest.mark.parametrize("rel", sorted(GSV))
def test_gsv_npy(shared_data, rel):
    ds = load_dataset(shared_data / GT / "vpr_gt_npy/datasets" / rel)
    assert ds.format == "gsv_npy" and (ds.num_db, ds.num_q) == GSV[rel]
    assert all(len(p) > 0 for p in ds.positives)


@pytest.mark.parametrize(
    "rel",
    [
        "Pittsburgh/pitts30k_test_qImages.npy",
        "Pittsburgh/pitts30k_val_dbImages.npy",
        "msls_test/msls_test_qImages.npy",
        "msls_val/msls_val_qIdx.npy",
        "Pittsburgh/pitts250k_test_qImages.npy",
    ],
)
def test_gsv_npy_partial_sets_say_what_is_missing(shared_data, rel):
    with pytest.raises(InputError, match="missing"):
        load_dataset(shared_data / GT / "vpr_gt_npy/datasets" / rel)


def test_gsv_npy_pittsburgh_lists_sizes(shared_data):
    d = shared_data / GT / "vpr_gt_npy/datasets/Pittsburgh"
    assert len(np.load(d / "pitts250k_test_qImages.npy")) == 8280
    assert len(np.load(d / "pitts30k_test_qImages.npy")) == 6816


# ---------------------------------------------------------------- Daejeon520 lat/lon
def _published(root: Path, thr: int) -> dict[str, set[str]]:
    out = {}
    for ln in (root / "annotations" / f"{thr}.csv").read_text().splitlines():
        parts = [x.strip() for x in ln.split(",") if x.strip()]
        out[parts[0]] = set(parts[1:])
    return out


def daejeon_agreement(ds: Dataset, pub: dict[str, set[str]], thr: float) -> tuple[float, float, float]:
    ours = ds.query_positives(thr)
    exact, jac, inter, n_ours = 0, [], 0, 0
    for qi, qn in enumerate(ds.q_images):
        a = {ds.db_images[j] for j in ours[qi]}
        b = pub[qn]
        exact += a == b
        jac.append(len(a & b) / len(a | b) if a | b else 1.0)
        inter += len(a & b)
        n_ours += len(a)
    return exact / ds.num_q, float(np.mean(jac)), inter / n_ours


def test_daejeon_latlon_positives_match_published(shared_data):
    root = shared_data / GT / "daejeon520_gt"
    ds = load_dataset(root)
    assert ds.format == "geotagged" and (ds.num_db, ds.num_q) == (32380, 500)
    assert ds.utm_zone == (52, "S")
    exact, jac, precision = daejeon_agreement(ds, _published(root, 25), 25.0)
    # measured: exact 0.42, Jaccard 0.875, 99.7% of our positives are published ones; the published
    # lists hold panoramas up to 30.2 m away (not an isotropic metric distance), hence not 1.0
    assert jac > 0.85 and precision > 0.99 and exact > 0.4
    # UTM distances agree with spherical great-circle ones within the sphere/ellipsoid gap (<0.5%)
    ll = ds.quirks.latlon
    e = haversine_m(ll["q"][:50, 0], ll["q"][:50, 1], ll["db"][:50, 0], ll["db"][:50, 1])
    u = np.linalg.norm(ds.q_utm[:50] - ds.db_utm[:50], axis=1)
    assert np.max(np.abs(e - u) / e) < 5e-3


# ---------------------------------------------------------------- Holidays list, labels
def test_holidays_protocol_from_real_list(shared_data):
    names = (shared_data / GT / "holidays_imagelist/holidays_images.dat").read_text().split()
    ds = holidays_from_names(names, Path("/nowhere"))
    assert (ds.num_db, ds.num_q, ds.metric) == (1491, 500, "holidays")
    assert sum(len(p) for p in ds.positives) == 991
    for q, pos, junk in zip(ds.q_images, ds.positives, ds.junk):
        assert int(q[:6]) % 100 == 0 and ds.db_images[junk[0]] == q
        assert all(ds.db_images[p][:4] == q[:4] and ds.db_images[p] != q for p in pos)


def test_ie_tower_floors(shared_data):
    ds = load_dataset(shared_data / "ie_tower_floors")
    assert (ds.format, ds.num_db, ds.num_q) == ("labels", 2373, 504)
    assert len(set(ds.db_labels)) == 25 and set(ds.q_labels) <= set(ds.db_labels)
    assert ds.db_paths()[0].is_file() and ds.q_paths()[-1].is_file()
    assert all(len(p) for p in ds.query_positives())


def _tower_csv(shared_data: Path, tmp_path: Path, extra: list[str]) -> tuple[Path, list[str]]:
    """The first rows of ie_tower_floors' dataset.csv (images linked) plus ``extra`` rows."""
    src = shared_data / "ie_tower_floors"
    lines = (src / "dataset.csv").read_text().splitlines()
    rows = [ln for ln in lines[1:] if ",gallery," in ln][:6] + [ln for ln in lines[1:] if ",query," in ln][:3]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "images").symlink_to(src / "images")
    (tmp_path / "t" / "dataset.csv").write_text("\n".join([lines[0]] + rows + extra) + "\n")
    return tmp_path / "t", rows


def test_label_csv_repeats_are_warned_and_counted_once(shared_data, tmp_path, caplog):
    root, rows = _tower_csv(shared_data, tmp_path, [])
    gallery, queries = rows[:6], rows[6:]
    clean = load_dataset(root)
    assert (clean.num_db, clean.num_q) == (6, 3) and not caplog.records
    # two gallery rows repeated, one twice; one query also listed in the gallery
    (root / "dataset.csv").write_text(
        "\n".join(
            [(shared_data / "ie_tower_floors/dataset.csv").read_text().splitlines()[0]]
            + rows
            + [gallery[0], gallery[0], gallery[3], queries[1].replace(",query,", ",gallery,")]
        )
        + "\n"
    )
    with caplog.at_level("WARNING", logger="hafloc.datasets.labels"):
        ds = load_dataset(root)
    assert ds.db_images == clean.db_images and ds.q_images == clean.q_images  # the database does not grow
    msgs = [r.getMessage() for r in caplog.records]
    assert any("3 repeated row(s) (same image, label and split) ignored" in m for m in msgs), msgs
    assert any(
        "1 image(s) listed as both gallery and query" in m and "kept as queries, removed from the gallery" in m
        for m in msgs
    ), msgs
    # the same image under two labels is an error: which place is it?
    img, label = gallery[1].split(",")[:2]
    (root / "dataset.csv").write_text((root / "dataset.csv").read_text() + f"{img},other_floor,query,x,y\n")
    with pytest.raises(
        InputError,
        match=rf"dataset\.csv: image '{img}' has label '{label}' on line 3 and "
        r"'other_floor' on line 15",
    ):
        load_dataset(root)


def test_split_database_label_set(shared_data):
    ds = load_dataset(shared_data / "ie_tower_floors")
    train, val = split_database(ds, 0.2, seed=3)
    assert train.num_q == 0 and train.db_images == val.db_images
    assert not set(val.q_images) & set(val.db_images)
    assert sorted(val.q_images + val.db_images) == sorted(ds.db_images)
    assert abs(val.num_q - 0.2 * ds.num_db) < 30 and all(len(p) for p in val.query_positives())
    again = split_database(ds, 0.2, seed=3)[1]
    assert again.q_images == val.q_images
    via_loader = load_dataset(shared_data / "ie_tower_floors", split="val", seed=3)
    assert via_loader.q_images == val.q_images


def test_split_database_positions():
    rng = np.random.default_rng(0)
    ds = Dataset("p", "at", Path("/x"), [f"{i}.jpg" for i in range(200)], [], db_utm=rng.uniform(0, 300, (200, 2)))
    train, val = split_database(ds, 0.25, seed=1)
    assert val.num_q == 50 and train.num_db == 150 and val.q_utm.shape == (50, 2)


# ---------------------------------------------------------------- '@' folders from GardensPoint
def test_gardenspoint_day_night_as_at_folders(shared_data, tmp_path):
    src = shared_data / "gardenspoint_mini/vprtutorial_first10"
    for i in range(10):
        east, north = 500000 + 40.0 * i, 6960000.0  # places 40 m apart along a path
        for side, sub, note in (("queries", "query", "day"), ("database", "ref", "night")):
            d = tmp_path / "gp" / "images" / "test" / side
            d.mkdir(parents=True, exist_ok=True)
            name = f"@{east:.2f}@{north:.2f}@56@J@-27.47@153.03@@@{i * 10}@@@@2014{i:02d}@{note}@.jpg"
            shutil.copy(src / sub / f"{i}.jpg", d / name)
    assert detect_format(tmp_path / "gp") == "at"
    ds = load_dataset(tmp_path / "gp")
    assert (ds.num_db, ds.num_q, ds.pos_threshold, ds.utm_zone) == (10, 10, 25.0, (56, "J"))
    assert [list(p) for p in ds.query_positives()] == [[i] for i in range(10)]
    assert ds.quirks.q_notes == ["day"] * 10 and all(p.is_file() for p in ds.q_paths())
    with pytest.raises(InputError, match="no 'train' split"):
        load_dataset(tmp_path / "gp", split="train")


def test_parse_at_name():
    f = parse_at_name(
        "images/test/queries/@0584744.97@4476709.92@17@T@40.44@-79.99@pano1@03@90.5@@@@20110101@a note@.jpg"
    )
    assert f["east"] == 584744.97 and f["north"] == 4476709.92 and f["zone"] == 17 and f["letter"] == "T"
    assert f["lat"] == 40.44 and f["pano"] == "pano1" and f["tile"] == "03" and f["heading"] == 90.5
    assert f["pitch"] is None and f["timestamp"] == "20110101" and f["note"] == "a note"
    assert parse_at_name("@1@2@.jpg")["zone"] is None
    with pytest.raises(ValueError):
        parse_at_name("@x@2@.jpg")
    with pytest.raises(ValueError):
        parse_at_name("plain.jpg")


def test_at_names_with_unusable_positions_are_refused(tmp_path):
    good = "@500000.00@6960000.00@56@J@-27.47@153.03@@@@@@@@q@.jpg"
    cases = {
        "@inf@6960000.00@56@J@@@@@@@@@@@.jpg": "east inf is not a finite number",
        "@500000.00@6960000.00@56@J@999@153.03@@@@@@@@@.jpg": "lat 999.0 is out of range",
        "@500000.00@6960000.00@56@J@-27.47@-181@@@@@@@@@.jpg": "lon -181.0 is out of range",
    }
    for k, (name, cause) in enumerate(cases.items()):
        root = tmp_path / str(k)
        _img(root / "images/test/queries" / good)
        _img(root / "images/test/database" / good)
        _img(root / "images/test/database" / name)
        with pytest.raises(InputError, match=rf"database/{re.escape(name)}: {cause}"):
            load_dataset(root)
    _img(tmp_path / "0/images/test/database" / "@nan@1@.jpg")
    with pytest.raises(InputError, match=r"\(2 images like it in database/\)"):
        load_dataset(tmp_path / "0")


def test_nonfinite_positions_are_refused_by_every_reader(tmp_path):
    write_pitts_dbstruct(tmp_path / "p.mat", ["a.jpg", "b.jpg"], ["c.jpg"], [[1, 2], [np.nan, 3]], [[1, 2]])
    with pytest.raises(
        InputError,
        match=r"p\.mat: database image 'b\.jpg' \(#2\) has position \(nan, 3\.0\), "
        r"not finite \(1 of 2 database positions are bad\)",
    ):
        load_dataset(tmp_path / "p.mat")
    with pytest.raises(InputError, match=r"query image 'q\.jpg' \(#1\)"):  # the safety net for any reader
        Dataset("x", "at", tmp_path, ["a.jpg"], ["q.jpg"], db_utm=[[0, 0]], q_utm=[[np.inf, 0]])
    (tmp_path / "g").mkdir()
    (tmp_path / "g/pos.csv").write_text("image,lat,lon,split\na.jpg,40.1,-79.9,database\nb.jpg,999,-79.9,query\n")
    with pytest.raises(InputError, match=r"pos\.csv: line 3: b\.jpg: lat/lon \(999\.0, -79\.9\) out of range"):
        load_dataset(tmp_path / "g")
    (tmp_path / "g/pos.csv").write_text("image,lat,lon,split\na.jpg,40.1,-79.9,database\nb.jpg,85.5,-79.9,query\n")
    with pytest.raises(InputError, match=r"pos\.csv: b\.jpg: latitude 85\.5 is beyond UTM's \+-84 degrees"):
        load_dataset(tmp_path / "g")


def test_position_csv_repeats(tmp_path, caplog):
    (tmp_path / "pos.csv").write_text(
        "image,easting,northing,zone,split\na.jpg,100,0,17T,database\n"
        "b.jpg,200,0,17T,database\na.jpg,100,0,17T,database\nb.jpg,200,0,17T,query\n"
        "c.jpg,190,10,17T,query\n"
    )
    with caplog.at_level("WARNING", logger="hafloc.datasets.geotagged"):
        ds = load_dataset(tmp_path)
    assert (ds.db_images, ds.q_images) == (["a.jpg"], ["b.jpg", "c.jpg"])
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    assert "1 repeated row(s) (same image and position) ignored" in msgs
    assert "1 image(s) listed as both database and query (e.g. b.jpg): kept as queries" in msgs
    (tmp_path / "pos.csv").write_text("image,easting,northing,zone\na.jpg,100,0,17T\na.jpg,150,0,17T\n")
    with pytest.raises(
        InputError,
        match=r"a\.jpg has two positions: \(100\.0, 0\.0\) on line 2 and "
        r"\(150\.0, 0\.0\) on line 3",
    ):
        load_dataset(tmp_path, format="geotagged")
    # Daejeon520-style database.csv + query.csv naming the same photo
    d = tmp_path / "dj"
    d.mkdir()
    (d / "database.csv").write_text("p1.jpg,36.35,127.38\np2.jpg,36.36,127.38\n")
    (d / "query.csv").write_text("p2.jpg,36.36,127.38\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="hafloc.datasets.geotagged"):
        ds = load_dataset(d)
    assert (ds.db_images, ds.q_images) == (["p1.jpg"], ["p2.jpg"])
    assert "listed as both database.csv and query.csv" in caplog.records[0].getMessage()


# ---------------------------------------------------------------- dbStruct fixtures (published layouts)
def _img(path: Path, color=(120, 30, 60)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)


def _cells(names: list[str]) -> np.ndarray:
    a = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        a[i, 0] = n
    return a


def write_pitts_dbstruct(path: Path, db: list[str], q: list[str], utm_db, utm_q, **extra) -> None:
    s = {
        "whichSet": "test",
        "dbImageFns": _cells(db),
        "utmDb": np.asarray(utm_db, float).T,
        "qImageFns": _cells(q),
        "utmQ": np.asarray(utm_q, float).T,
        "numImages": len(db),
        "numQueries": len(q),
        "posDistThr": 25,
        "posDistSqThr": 625,
        "nonTrivPosDistSqThr": 100,
    }
    s.update(extra)
    scipy.io.savemat(str(path), {"dbStruct": s})


def test_pittsburgh_layout_queries_real(tmp_path):
    root = tmp_path / "Pittsburgh"
    db = ["000/000000_pitch1_yaw1.jpg", "000/000000_pitch1_yaw2.jpg", "000/000001_pitch1_yaw1.jpg"]
    q = ["000/000500_pitch1_yaw1.jpg"]
    for n in db:
        _img(root / n)
    _img(root / "queries_real" / q[0])
    (root / "datasets").mkdir()
    write_pitts_dbstruct(
        root / "datasets/pitts30k_test.mat", db, q, [[584000, 4476000]] * 2 + [[584100, 4476000]], [[584010, 4476005]]
    )
    ds = load_dataset(root, split="test")  # finds datasets/pitts30k_test.mat, images under root
    assert ds.root == root and ds.q_images == ["queries_real/000/000500_pitch1_yaw1.jpg"]
    assert all(p.is_file() for p in ds.db_paths() + ds.q_paths())
    assert list(ds.query_positives()[0]) == [0, 1]
    assert ds.quirks.which_set == "test" and ds.quirks.tokyo_nms is None


def test_tokyo_layout_png_files_and_panoramas(tmp_path):
    root = tmp_path / "tokyo"
    db = [f"03814/381418.231_3946450.428/PANO{p}_012_{y:03d}.jpg" for p in range(2) for y in range(0, 360, 30)]
    for n in db:
        _img(root / Path(n).with_suffix(".png"))
    q = ["247query_subset_v2/00001.jpg"]
    _img(root / q[0])
    write_pitts_dbstruct(root / "tokyo247.mat", db, q, [[381418.23, 3946450.43]] * 24, [[381420, 3946451]])
    ds = load_dataset(root / "tokyo247.mat")
    assert ds.db_images[0].endswith(".png") and all(p.is_file() for p in ds.db_paths())
    assert len(set(ds.quirks.tokyo_nms)) == 2 and ds.q_images == q


def test_tokyotm_layout_timestamps(tmp_path):
    db = [f"d/{i}.jpg" for i in range(4)]
    cells = np.empty((1, 12), dtype=object)
    fields = [
        "train",
        _cells(db),
        np.zeros((2, 4)) + [[380000], [3940000]],
        np.array([[2009, 2009, 2012, 2012]]),
        _cells(["q/0.jpg"]),
        np.array([[380000.0], [3940000.0]]),
        np.array([[2012]]),
        4,
        1,
        25,
        625,
        100,
    ]
    for i, v in enumerate(fields):
        cells[0, i] = v
    scipy.io.savemat(str(tmp_path / "tokyoTM_val.mat"), {"dbStruct": cells})  # unnamed 12-field cell
    ds = load_dbstruct(tmp_path / "tokyoTM_val.mat")
    np.testing.assert_array_equal(ds.quirks.timestamps["db"], [2009, 2009, 2012, 2012])
    assert ds.quirks.timestamps["q"].tolist() == [2012] and ds.num_db == 4


# ---------------------------------------------------------------- broken inputs
def test_broken_dbstruct_files(shared_data, tmp_path):
    data = (shared_data / GT / "heaputil_dbstruct/berlin.mat").read_bytes()
    (tmp_path / "trunc.mat").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"trunc\.mat: not a readable MATLAB"):
        load_dataset(tmp_path / "trunc.mat")
    (tmp_path / "empty.mat").write_bytes(b"")
    with pytest.raises(InputError, match="empty.mat"):
        load_dataset(tmp_path / "empty.mat")
    write_pitts_dbstruct(tmp_path / "ok.mat", ["a.jpg"], ["b.jpg"], [[1, 2]], [[1, 2]])
    s = scipy.io.loadmat(str(tmp_path / "ok.mat"))["dbStruct"]
    fields = {n: s[n][0, 0] for n in s.dtype.names if n != "utmQ"}
    scipy.io.savemat(str(tmp_path / "nofield.mat"), {"dbStruct": fields})
    with pytest.raises(InputError, match="no field 'utmQ'"):
        load_dataset(tmp_path / "nofield.mat")
    scipy.io.savemat(str(tmp_path / "other.mat"), {"x": np.zeros(3)})
    with pytest.raises(InputError, match="no 'dbStruct'"):
        load_dataset(tmp_path / "other.mat")
    fields = {n: s[n][0, 0] for n in s.dtype.names}
    fields["numImages"] = 7
    scipy.io.savemat(str(tmp_path / "count.mat"), {"dbStruct": fields})
    with pytest.raises(InputError, match="numImages=7 but 1 database names"):
        load_dataset(tmp_path / "count.mat")


def test_broken_csv_and_npz(shared_data, tmp_path):
    (tmp_path / "a").mkdir()
    lines = (shared_data / "ie_tower_floors/dataset.csv").read_text().splitlines()[:20]
    (tmp_path / "a/dataset.csv").write_text("\n".join(lines[:5] + ["broken,row"] + lines[5:]) + "\n")
    with pytest.raises(InputError, match=r"dataset\.csv: line 6: 2 fields, header has 5"):
        load_dataset(tmp_path / "a")
    (tmp_path / "a/dataset.csv").write_text("image,label\nx.jpg,1\n")
    with pytest.raises(InputError, match="missing column"):
        load_dataset(tmp_path / "a/dataset.csv", format="labels")
    (tmp_path / "a/dataset.csv").write_text("image,label,split\nx.jpg,1,sideways\n")
    with pytest.raises(InputError, match="unknown split 'sideways'"):
        load_dataset(tmp_path / "a")
    gt = shared_data / GT / "patchnetvlad_gt"
    (tmp_path / "dataset_gt_files").mkdir()
    shutil.copytree(gt / "dataset_imagenames", tmp_path / "dataset_imagenames")
    raw = (gt / "dataset_gt_files/pitts30k_test.npz").read_bytes()
    (tmp_path / "dataset_gt_files/pitts30k_test.npz").write_bytes(raw[:1000])
    with pytest.raises(InputError, match="not a readable .npz"):
        load_dataset(tmp_path / "dataset_gt_files/pitts30k_test.npz")
    np.savez(
        tmp_path / "dataset_gt_files/pitts30k_test.npz",
        utmQ=np.zeros((6816, 2)),
        utmDb=np.zeros((10, 2)),
        posDistThr=25,
    )
    with pytest.raises(InputError, match="10000 names but 10 database positions"):
        load_dataset(tmp_path / "dataset_gt_files/pitts30k_test.npz")
    np.savez(tmp_path / "dataset_gt_files/pitts30k_test.npz", utmQ=np.zeros((6816, 2)))
    with pytest.raises(InputError, match="missing array 'utmDb'"):
        load_dataset(tmp_path / "dataset_gt_files/pitts30k_test.npz")
    (tmp_path / "gp/images/test/database").mkdir(parents=True)
    _img(tmp_path / "gp/images/test/database/@abc@1@.jpg")
    with pytest.raises(InputError, match="east 'abc' is not a number"):
        load_dataset(tmp_path / "gp")


def test_latin1_or_empty_csv_names_the_real_problem(shared_data, tmp_path):
    """Not "cannot tell the dataset layout": the encoding or the emptiness, naming the file."""
    rows = (shared_data / "ie_tower_floors/dataset.csv").read_text().splitlines()[:6]
    text = "\n".join(rows[:3] + ["caf\u00e9_0001.jpg,floor_01,gallery,a,b"] + rows[3:]) + "\n"
    (tmp_path / "dataset.csv").write_bytes(text.encode("latin-1"))
    for target in (tmp_path, tmp_path / "dataset.csv"):
        with pytest.raises(InputError, match=r"dataset\.csv: CSV is not UTF-8 text \(byte 0xe9 on line 4"):
            load_dataset(target)
    (tmp_path / "dataset.csv").write_bytes(text.encode("utf-8"))
    assert detect_format(tmp_path) == "labels"  # the same rows in UTF-8 are a label set
    (tmp_path / "dataset.csv").write_bytes(b"")
    for target in (tmp_path, tmp_path / "dataset.csv"):
        with pytest.raises(InputError, match=r"dataset\.csv: empty CSV file"):
            load_dataset(target)
    (tmp_path / "dataset.csv").unlink()
    (tmp_path / "positions.csv").write_bytes("image,lat,lon\nz\u00fcrich.jpg,47.37,8.54\n".encode("cp1252"))
    with pytest.raises(InputError, match=r"positions\.csv: CSV is not UTF-8 text"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------- Oxford / Paris / revisited / Holidays fixtures
def _oxford_tree(root: Path, prefix: str, landmark_dirs: bool) -> list[str]:
    names = [f"{prefix}_{i:06d}" for i in range(6)]
    for i, n in enumerate(names):
        _img(root / "jpg" / (prefix if landmark_dirs else "") / f"{n}.jpg", (i * 40, 0, 0))
    gt = root / "gt"
    gt.mkdir(parents=True)
    qname = f"oxc1_{names[0]}" if prefix == "all_souls" else names[0]
    (gt / f"{prefix}_1_query.txt").write_text(f"{qname} 1.5 2.0 6.0 5.5\n")
    (gt / f"{prefix}_1_good.txt").write_text(f"{names[0]}\n{names[1]}\n")
    (gt / f"{prefix}_1_ok.txt").write_text(f"{names[2]}\n")
    (gt / f"{prefix}_1_junk.txt").write_text(f"{names[3]}\n")
    return names


@pytest.mark.parametrize("prefix,landmark_dirs", [("all_souls", False), ("defense", True)])
def test_oxford_paris_layout(tmp_path, prefix, landmark_dirs):
    names = _oxford_tree(tmp_path, prefix, landmark_dirs)
    (tmp_path / "jpg" / (prefix if landmark_dirs else "") / "corrupt_000001.jpg").write_bytes(b"")
    assert detect_format(tmp_path) == "oxford"
    ds = load_dataset(tmp_path, queries="crop")
    assert ds.num_db == 6 and ds.quirks.dropped == ["corrupt_000001"] and ds.metric == "map"
    assert ds.q_paths()[0].is_file() and Path(ds.q_images[0]).stem == names[0]
    assert list(ds.positives[0]) == [0, 1, 2] and list(ds.junk[0]) == [3]
    assert ds.quirks.crop_boxes.tolist() == [[1.5, 2.0, 6.0, 5.5]] and ds.quirks.crop_queries
    assert ds.name == ("oxford5k" if prefix == "all_souls" else "paris6k")


def test_revisited_layout(tmp_path):
    for i in range(5):
        _img(tmp_path / "jpg" / f"im{i}.jpg")
    _img(tmp_path / "jpg" / "q0.jpg")
    gnd = {
        "imlist": [f"im{i}" for i in range(5)],
        "qimlist": ["q0"],
        "gnd": [{"easy": [0], "hard": [2, 3], "junk": [4], "bbx": [0, 0, 5, 5]}],
    }
    with open(tmp_path / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump(gnd, f)
    ds = load_dataset(tmp_path)
    assert ds.format == "revisited" and ds.name == "roxford5k" and ds.metric == "revisited"
    assert list(ds.positives[0]) == [0, 2, 3] and ds.q_paths()[0].is_file()
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable pickle"):
        load_dataset(tmp_path)


def test_holidays_folder(tmp_path):
    for n in ("100000", "100001", "100002", "100100", "100101"):
        _img(tmp_path / "jpg" / f"{n}.jpg")
    assert detect_format(tmp_path) == "holidays"
    ds = load_dataset(tmp_path)
    assert ds.q_images == ["jpg/100000.jpg", "jpg/100100.jpg"]
    assert [list(p) for p in ds.positives] == [[1, 2], [4]] and [list(j) for j in ds.junk] == [[0], [3]]


# ---------------------------------------------------------------- geotagged photos, GPS, UTM
def _jpeg_with_gps(path: Path, lat: float, lon: float) -> None:
    from PIL.TiffImagePlugin import IFDRational

    def dms(x):
        x = abs(x)
        d = int(x)
        m = int((x - d) * 60)
        s = (x - d - m / 60) * 3600
        return (IFDRational(d, 1), IFDRational(m, 1), IFDRational(int(round(s * 1000)), 1000))

    im = Image.new("RGB", (8, 8), (10, 200, 30))
    exif = Image.Exif()
    exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, exif=exif)


def test_read_gps(tmp_path):
    _jpeg_with_gps(tmp_path / "a.jpg", -33.8568, 151.2153)
    _jpeg_with_gps(tmp_path / "b.jpg", 40.4406, -79.9959)
    lat, lon = read_gps(tmp_path / "a.jpg")
    assert abs(lat + 33.8568) < 1e-5 and abs(lon - 151.2153) < 1e-5
    lat, lon = read_gps(tmp_path / "b.jpg")
    assert abs(lat - 40.4406) < 1e-5 and abs(lon + 79.9959) < 1e-5
    _img(tmp_path / "c.jpg")
    assert read_gps(tmp_path / "c.jpg") is None
    (tmp_path / "d.jpg").write_bytes(b"not an image")
    with pytest.raises(InputError, match="d.jpg"):
        read_gps(tmp_path / "d.jpg")


def test_geotagged_exif_folders(tmp_path):
    base = (40.4406, -79.9959)
    for i in range(3):
        _jpeg_with_gps(tmp_path / "database" / f"{i}.jpg", base[0] + i * 0.001, base[1])  # ~111 m apart
    _jpeg_with_gps(tmp_path / "queries" / "q.jpg", base[0] + 0.00005, base[1])  # 5.6 m north of db 0
    _img(tmp_path / "queries" / "nogps.jpg")
    ds = load_dataset(tmp_path)
    assert ds.format == "geotagged" and ds.utm_zone == (17, "T") and ds.quirks.skipped == ["queries/nogps.jpg"]
    assert [list(p) for p in ds.query_positives()] == [[0]]
    assert abs(np.linalg.norm(ds.q_utm[0] - ds.db_utm[0]) - 5.56) < 0.05


def test_geotagged_csv_with_split_column(tmp_path):
    (tmp_path / "pos.csv").write_text(
        "image,easting,northing,zone,split\na.jpg,100,0,17T,database\n"
        "b.jpg,200,0,17T,database\nc.jpg,190,10,17T,query\n"
    )
    ds = load_dataset(tmp_path)
    assert (ds.db_images, ds.q_images, ds.utm_zone) == (["a.jpg", "b.jpg"], ["c.jpg"], (17, "T"))
    assert [list(p) for p in ds.query_positives()] == [[1]]
    (tmp_path / "pos.csv").write_text("image,lat,lon,split\na.jpg,40.1,nope,database\n")
    with pytest.raises(InputError, match="line 2: lon 'nope' is not a number"):
        load_dataset(tmp_path)


def test_latlon_to_utm_known_points_and_forced_zone():
    # the utm package README's example point
    e, n, zn, zl = latlon_to_utm(np.array([51.2]), np.array([7.5]))
    assert (zn, zl) == (32, "U") and abs(e[0] - 395201.31) < 0.01 and abs(n[0] - 5673135.24) < 0.01
    assert latlon_to_utm(np.array([40.4406]), np.array([-79.9959]))[2:] == (17, "T")  # Pittsburgh
    # points on both sides of a zone border go into the majority zone, so distances stay metric
    lat = np.array([35.0, 35.0, 35.0])
    lon = np.array([137.999, 138.0005, 137.998])  # zone 53 | 54 border at 138 E
    e, n, zn, zl = latlon_to_utm(lat, lon)
    assert zn == 53
    d_utm = np.hypot(e[1] - e[0], n[1] - n[0])
    assert abs(d_utm - haversine_m(35.0, 137.999, 35.0, 138.0005)) < 0.5
    la, lo = utm_to_latlon(e, n, zn, zl)
    np.testing.assert_allclose(la, lat, atol=1e-6) and np.testing.assert_allclose(lo, lon, atol=1e-6)
    e2, *_ = latlon_to_utm(lat, lon, zone="54S")
    assert e2[0] != e[0]
    with pytest.raises(ValueError):
        latlon_to_utm(np.array([91.0]), np.array([0.0]))


def test_subset_reindexes_positives_and_quirks():
    ds = Dataset(
        "s",
        "vprbench",
        Path("/x"),
        ["a", "b", "c", "d"],
        ["q0", "q1"],
        positives=[[1, 3], [0]],
        quirks=Quirks(tokyo_nms=np.array(["p", "p", "r", "r"]), timestamps={"db": np.arange(4), "q": np.arange(2)}),
    )
    sub = ds.subset(db_idx=[3, 0, 1], q_idx=[1, 0])
    assert sub.db_images == ["d", "a", "b"] and sub.q_images == ["q1", "q0"]
    assert [list(p) for p in sub.positives] == [[1], [0, 2]]
    assert list(sub.quirks.tokyo_nms) == ["r", "p", "p"] and list(sub.quirks.timestamps["q"]) == [1, 0]
    assert ds.quirks.tokyo_nms.tolist() == ["p", "p", "r", "r"]  # the original keeps its own record


def test_split_database_drops_query_quirks_and_revisited_needs_its_lists():
    ds = Dataset(
        "s",
        "at",
        Path("/x"),
        [f"{i}.jpg" for i in range(10)],
        ["q0"],
        db_utm=np.c_[np.arange(10) * 100.0, np.zeros(10)],
        q_utm=[[0.0, 0.0]],
        quirks=Quirks(
            db_notes=[str(i) for i in range(10)], q_notes=["n"], capture_times={"db": list(range(10)), "q": [0]}
        ),
    )
    train, val = split_database(ds, val_fraction=0.2, seed=0)
    assert train.quirks.q_notes is None and train.quirks.capture_times is None
    assert train.quirks.db_notes == [Path(n).stem for n in train.db_images]  # indexed with the database
    assert val.quirks.split_from_database["val_query_db_indices"] == [int(Path(n).stem) for n in val.q_images]
    with pytest.raises(ValueError, match="revisited"):
        Dataset("r", "revisited", Path("/x"), ["a"], ["q"], positives=[[0]], metric="revisited")


def test_formats_registry():
    assert {
        "at",
        "dbstruct",
        "patchnetvlad",
        "vprbench",
        "gsv_npy",
        "oxford",
        "revisited",
        "holidays",
        "sf0",
        "labels",
        "geotagged",
    } == set(FORMATS)


def test_sf0_both_protocols(tmp_path):
    db = [
        "PCI_sp_11841_37.789727_-122.386935_937762214_0_727224067_246.264_-37.8198.jpg",
        "PCI_sp_11842_37.789800_-122.386935_937762215_0_727224068_246.264_-37.8198.jpg",
        "PCI_sp_11843_37.795000_-122.386935_937762216_0_727224069_246.264_-37.8198.jpg",
    ]
    for n in db:
        _img(tmp_path / "database" / n)
    _img(tmp_path / "queries" / "0001.jpg")
    (tmp_path / "cartoid_groundTruth.txt").write_text("0001.jpg 77 78\n")
    (tmp_path / "db_building_ids.txt").write_text(f"{db[0]} 5\n{db[1]} 78\n{db[2]} 77 9\n")
    (tmp_path / "query_poses.csv").write_text("image,lat,lon\n0001.jpg,37.789730,-122.386935\n")
    ds = load_dataset(tmp_path)
    assert ds.format == "sf0" and [list(p) for p in ds.positives] == [[1, 2]] and "building" in ds.quirks.protocol
    ds = load_dataset(tmp_path, protocol="posed")
    assert ds.utm_zone == (10, "S") and [list(p) for p in ds.query_positives()] == [
        [0, 1]
    ]  # 8 m north is in, 586 m is out


def test_one_image_listing_for_readers_and_extraction(tmp_path):
    # datasets.common.list_images and images.io.list_images are one listing: same files, same order
    from hafloc.datasets.common import list_images as dataset_names
    from hafloc.images.io import list_images

    for name in ("img10.jpg", "img2.jpg", "IMG3.PNG", ".hidden.jpg", "notes.txt", "sub/img1.jpeg", "a.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    expected = ["a.webp", "img2.jpg", "IMG3.PNG", "img10.jpg", "sub/img1.jpeg"]  # natural order, no hidden files
    assert dataset_names(tmp_path) == expected
    assert [p.relative_to(root).as_posix() for p, root in list_images([tmp_path])] == expected
    assert dataset_names(tmp_path / "sub", tmp_path) == ["sub/img1.jpeg"]


def test_label_csv_is_recognised_by_content_not_name(shared_data, tmp_path):
    """A folder's label CSV may have any name: its header (image, label) says what it is."""
    root, rows = _tower_csv(shared_data, tmp_path, [])
    (root / "dataset.csv").rename(root / "floors.csv")
    (root / "notes.csv").write_text("image,comment\nx.jpg,blurry\n")  # another CSV: not a label CSV
    assert detect_format(root) == "labels"
    ds = load_dataset(root)
    assert (ds.format, ds.num_db, ds.num_q) == ("labels", 6, 3) and ds.db_paths()[0].is_file()
    shutil.copy(root / "floors.csv", root / "more.csv")
    with pytest.raises(InputError, match=r"t: 2 label CSVs here \(floors\.csv, more\.csv\); pass one file"):
        load_dataset(root)
    assert load_dataset(root / "more.csv").num_q == 3  # the file itself, by content too

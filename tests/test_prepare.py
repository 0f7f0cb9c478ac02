"""`hafloc dataset prepare`: fake repositories in the published layouts of the two sources, read as a
checkout and as a bare git directory; geographic splits, protocols, bad input."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hafloc.cli import main as cli
from hafloc.datasets.atfolders import parse_at_name
from hafloc.datasets.base import combine, source_subsets
from hafloc.datasets.detect import load_dataset
from hafloc.datasets.geo import latlon_to_utm, utm_to_latlon
from hafloc.datasets.prepare import band_split, prepare
from hafloc.errors import HaflocError, InputError
from hafloc.metrics.protocols import score

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is needed to build the fake repositories")


def jpeg(seed: int) -> bytes:
    px = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def git_repo(root: Path, files: dict[str, bytes]) -> tuple[Path, Path]:
    """(checkout, bare git dir) holding ``files`` in one commit."""
    work = root / "checkout"
    for rel, data in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
    env = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    subprocess.run(["git", "-C", str(work), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(work), *env, "commit", "-qm", "data"], check=True)
    bare = root / "mirror.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    return work, bare


# 36 locations 20 m apart along a street running east (Cambridge, UK), 5 views each (4 headings + sky)
N_LOC = 36


def cambridge_files() -> dict[str, bytes]:
    e0, n0, zone, letter = latlon_to_utm(52.2050, 0.1195)
    lines = []
    files: dict[str, bytes] = {}
    for i in range(N_LOC):
        lat, lon = utm_to_latlon(e0 + 20.0 * i, n0, zone, letter)
        lines.append(f"{lat},{lon}")
        for h in range(5):
            files[f"data/images/{i}_{h}.jpg"] = jpeg(i * 10 + h)
    files["data/images/7_2.jpg"] = files["data/images/3_2.jpg"]  # a duplicate view
    files["data/coordinates"] = ("\n".join(lines) + "\n").encode()
    files["README.md"] = b"street view\n"
    return files


def sf_files() -> dict[str, bytes]:
    files = {}
    for p in range(24):  # 24 places 20 m apart, each seen in two capture months
        east, north = 544000.0 + 20.0 * p, 4173400.0
        lat, lon = utm_to_latlon(east, north, 10, "S")
        for month in ("201107", "201910"):
            name = f"night@{east:.2f}@{north:.2f}@10@S@{lat:09.5f}@{lon:.5f}@PANO{p}{month}@@0@@@@{month}@@.jpg"
            files[f"syntethic_night_augmentation/37.70/{name}"] = jpeg(1000 + p * 2 + (month == "201910"))
    files["syntethic_night_augmentation/37.70/.ipynb_checkpoints/x-checkpoint.jpg"] = jpeg(5)
    return files


@pytest.fixture(scope="module")
def cambridge(tmp_path_factory):
    return git_repo(tmp_path_factory.mktemp("cam"), cambridge_files())


def place_positions(root: Path, split: str) -> np.ndarray:
    names = [p.name for p in (root / "images" / split).rglob("@*.jpg")]
    return np.array(sorted({(parse_at_name(n)["east"], parse_at_name(n)["north"]) for n in names}))


def test_cambridge_split_is_geographic_and_complete(cambridge, tmp_path):
    work, _ = cambridge
    s = prepare("cambridge-streetview", work, tmp_path / "out", progress=False)
    pos = {sp: place_positions(tmp_path / "out", sp) for sp in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        d = np.linalg.norm(pos[a][:, None] - pos[b][None], axis=2)
        assert d.min() >= 50.0 - 1e-6, (a, b, d.min())
    assert len(pos["val"]) == len(pos["test"]) == round(0.15 * N_LOC)
    # sky views dropped, the duplicate kept once; every kept view is one of 4 headings
    names = [p.name for p in (tmp_path / "out" / "images").rglob("@*.jpg")]
    assert {parse_at_name(n)["heading"] for n in names} <= {0.0, 90.0, 180.0, 270.0}
    assert s["duplicates_dropped"] == 1
    kept_places = sum(s["places"].values())
    assert len(names) == 4 * kept_places - 1
    assert s["places_dropped_in_gaps"] == N_LOC - kept_places > 0
    # positions survive the round trip ('@' name -> UTM) and the layout loads
    test = load_dataset(tmp_path / "out", split="test")
    assert test.num_q > 0 and test.num_db > 0 and test.format == "at"
    train = load_dataset(tmp_path / "out", split="train")
    assert train.num_q == 0 and train.num_db == s["images"]["train"]["database"] > 0
    # queries are the views of every 3rd location of the split: each has a neighbour at 20 m in the database
    pos_lists = test.query_positives()
    assert all(len(p) > 0 for p in pos_lists)


def test_git_dir_equals_checkout_and_rerun_is_idempotent(cambridge, tmp_path):
    work, bare = cambridge
    a = prepare("cambridge-streetview", work, tmp_path / "a", progress=False)
    b = prepare("cambridge-streetview", bare, tmp_path / "b", progress=False)
    files_a = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*.jpg"))
    files_b = sorted(str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*.jpg"))
    assert files_a == files_b and files_a
    assert a["images"] == b["images"]
    for rel in files_a[:5]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()  # bytes unchanged
    again = prepare("cambridge-streetview", bare, tmp_path / "b", progress=False)
    assert again["images"] == b["images"]
    assert sorted(str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*.jpg")) == files_b


def test_seed_turns_the_split():
    xy = np.stack([np.arange(40) * 20.0, (np.arange(40) % 7) * 30.0], axis=1)
    a, b = band_split(xy, seed=0), band_split(xy, seed=1)
    assert (a == band_split(xy, seed=0)).all()  # deterministic
    assert (a != b).any()
    for split in (a, b):
        kept = split != ""
        for s1 in ("train", "val", "test"):
            for s2 in ("train", "val", "test"):
                if s1 < s2:
                    d = np.linalg.norm(xy[split == s1][:, None] - xy[split == s2][None], axis=2)
                    assert d.min() >= 50.0
        assert kept.sum() < len(xy)


def test_sf_night_scores_only_other_months(tmp_path):
    work, bare = git_repo(tmp_path / "repo", sf_files())
    s = prepare("sf-night", bare, tmp_path / "out", progress=False)  # HEAD of the fake repo has the folder
    assert s["images"]["train"]["queries"] == 0
    assert "other capture month" in s["protocol"]
    assert json.loads((tmp_path / "out/images/test/protocol.json").read_text())["exclude_same"] == "timestamp"
    assert not any("checkpoint" in p.name for p in (tmp_path / "out").rglob("*.jpg"))
    ds = load_dataset(tmp_path / "out", split="test")
    assert ds.quirks.timestamps is not None and ds.num_q >= 2
    q_ts, db_ts = ds.quirks.timestamps["q"], ds.quirks.timestamps["db"]
    rng = np.random.default_rng(0)
    db = rng.normal(size=(ds.num_db, 32)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = np.zeros((ds.num_q, 32), np.float32)
    mimic = {}  # query -> the database image it is made identical to
    for i in range(ds.num_q):
        d = np.linalg.norm(ds.db_utm - ds.q_utm[i], axis=1)
        same_month = np.flatnonzero((d <= 25.0) & (db_ts == q_ts[i]))  # a neighbour place, 20 m away
        other_month = np.flatnonzero((d < 1.0) & (db_ts != q_ts[i]))  # its own place, another capture
        assert len(other_month) == 1
        mimic[i] = (same_month[0], False) if i % 2 and len(same_month) else (other_month[0], True)
        q[i] = db[mimic[i][0]]
    assert any(not right for _, right in mimic.values())
    res = score(ds, db, q)
    for i, (j, right) in mimic.items():
        if right:  # another month of the same place: found first
            assert res["_ranks"][i][0] == j
        else:  # the same month 20 m away is left out of the ranking, though it is the nearest descriptor
            assert j not in res["_ranks"][i]


def test_combined_sets_keep_sources_apart(cambridge, tmp_path):
    work, _ = cambridge
    prepare("cambridge-streetview", work, tmp_path / "cam", progress=False)
    (tmp_path / "cam2").symlink_to(tmp_path / "cam")
    a = load_dataset(tmp_path / "cam", split="val")
    b = load_dataset(tmp_path / "cam2", split="val")
    both = combine([a, b])
    assert both.num_db == 2 * a.num_db and both.num_q == 2 * a.num_q
    parts = source_subsets(both)
    assert [len(db) for _, db, _ in parts] == [a.num_db, b.num_db]
    # same positions in both sets, yet no query has a positive in the other set
    for qi, pos in enumerate(both.query_positives()):
        src = both.quirks.sources["q"][qi]
        assert (both.quirks.sources["db"][pos] == src).all() and len(pos)
    assert all(Path(p).is_file() for p in both.db_paths())


def test_bad_sources_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(InputError, match="source not found"):
        prepare("cambridge-streetview", tmp_path / "nope", tmp_path / "out")
    files = cambridge_files()
    files["data/coordinates"] = b"52.2,0.1\nnot a number\n"
    work, _ = git_repo(tmp_path / "bad", files)
    with pytest.raises(InputError, match=r"coordinates.*line 2"):
        prepare("cambridge-streetview", work, tmp_path / "out", progress=False)
    with pytest.raises(HaflocError, match="at least 50 m"):
        prepare("cambridge-streetview", work, tmp_path / "out", gap_m=20)
    empty, _ = git_repo(tmp_path / "empty", {"README.md": b"x"})
    assert cli(["dataset", "prepare", "sf-night", "--source", str(empty), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hafloc: error:")

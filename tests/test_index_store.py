"""The persistent index folder: building, positions, resuming after a real SIGKILL, locating."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hafloc.datasets.geo import haversine_m
from hafloc.errors import InputError, ModelMismatchError
from hafloc.index.locate import locate_descriptors
from hafloc.index.positions import read_positions_csv
from hafloc.index.search import SearchConfig
from hafloc.index.store import Extracted, IndexStore

REPO = Path(__file__).resolve().parents[1]
DIM = 48
FP = "f" * 64


def shared_data() -> Path:
    return Path(os.environ.get("HAFLOC_SHARED_DATA", REPO.parent / "shared" / "data"))


def standin_descriptor(path: Path) -> np.ndarray:
    """A deterministic global descriptor: the 4x4 RGB thumbnail, centred and L2-normalised."""
    with Image.open(path) as im:
        x = np.asarray(im.convert("RGB").resize((4, 4), Image.BILINEAR), dtype=np.float32).ravel()
    x = x - x.mean()
    return (x / (np.linalg.norm(x) + 1e-12)).astype(np.float32)


def standin_extract(paths: list[Path], names: list[str], delay: float = 0.0) -> Extracted:
    """Extraction callback over ``standin_descriptor``; unreadable files become failures."""
    ok, desc, failures = [], [], []
    for p, n in zip(paths, names):
        try:
            desc.append(standin_descriptor(p))
            ok.append(n)
        except OSError as err:
            failures.append((n, f"not a readable image ({type(err).__name__})"))
    time.sleep(delay)
    return Extracted(ok, np.stack(desc) if desc else np.zeros((0, DIM), np.float32), failures)


# landmark positions; images of one landmark are spread 100 m apart so each has its own place
LANDMARKS = {
    "london_bridge": (51.5079, -0.0877),
    "piazza_san_marco": (45.4341, 12.3388),
    "sacre_coeur": (48.8867, 2.3431),
    "st_pauls_cathedral": (51.5138, -0.0984),
    "united_states_capitol": (38.8899, -77.0091),
}
AT_NAME = "@0451843.93@5415068.87@31@U@48.886700@2.343100@@@@@@@@@.jpg"
EXIF_NAME = "exif_gps.jpg"


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory) -> dict:
    """20 real photos (half in a subfolder), one '@'-named, one with EXIF GPS, one truncated file,
    and a positions CSV covering 15 of them."""
    src = shared_data() / "landmarks_mini" / "images"
    if not src.is_dir():
        pytest.skip(f"shared test data not found at {src} (set HAFLOC_SHARED_DATA)")
    root = tmp_path_factory.mktemp("photos")
    photos = sorted(src.glob("*.jpg"))[:20]
    rels, csv_rows, expected = [], ["image,lat,lon"], {}
    per_landmark: dict[str, int] = {}
    for i, p in enumerate(photos):
        rel = f"sub/{p.name}" if i % 2 else p.name
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / rel)
        rels.append(rel)
        if i < 15:
            landmark = next(k for k in LANDMARKS if p.name.startswith(k))
            j = per_landmark[landmark] = per_landmark.get(landmark, -1) + 1
            lat, lon = LANDMARKS[landmark][0] + j * 0.001, LANDMARKS[landmark][1]
            # the CSV names some images by relative path, some by bare file name
            csv_rows.append(f"{rel if i % 3 else p.name},{lat},{lon}")
            expected[rel] = (lat, lon, "csv")
    # flipped copies, so that no two indexed images share a descriptor
    with Image.open(photos[0]) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / AT_NAME)
    rels.append(AT_NAME)
    expected[AT_NAME] = (48.8867, 2.3431, "at-name")
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 28.44), 3: "W", 4: (0.0, 5.0, 15.72)}
    with Image.open(photos[1]) as im:
        im.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(root / EXIF_NAME, exif=exif)
    rels.append(EXIF_NAME)
    expected[EXIF_NAME] = (51.5079, -0.0877, "exif")
    (root / "broken.jpg").write_bytes(photos[2].read_bytes()[:300])
    rels.append("broken.jpg")
    (root / "positions.csv").write_text("\n".join(csv_rows) + "\n")
    unpositioned = sorted(r for r in rels if r not in expected and r != "broken.jpg")
    return {
        "root": root,
        "rels": rels,
        "expected": expected,
        "unpositioned": unpositioned,
        "csv": root / "positions.csv",
    }


def build(folder: Path, photo_root: dict, chunk_size: int = 4) -> tuple[IndexStore, object]:
    store = IndexStore.open_or_create(folder, FP, DIM, SearchConfig(), model_path="standin.pt")
    report = store.add(
        photo_root["rels"],
        photo_root["root"],
        standin_extract,
        positions=read_positions_csv(photo_root["csv"]),
        chunk_size=chunk_size,
        progress=False,
    )
    return store, report


def snapshot(folder: Path) -> dict:
    """path -> (descriptor, lat, lon, source) of a finished index, plus a duplicate check."""
    with IndexStore.open(folder) as store:
        _, names, desc = store.descriptors()
        assert len(names) == len(set(names)), "duplicate rows"
        meta = {r["path"]: r for r in store.images()}
        assert len(meta) == len(store)
    return {n: (d, meta[n]["lat"], meta[n]["lon"], meta[n]["position_source"]) for n, d in zip(names, desc)}


@pytest.fixture(scope="module")
def reference(photo_root, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("ref") / "index"
    store, report = build(folder, photo_root)
    store.close()
    return {"folder": folder, "report": report, "snap": snapshot(folder)}


def test_build_indexes_positions_and_reports(photo_root, reference):
    report, snap = reference["report"], reference["snap"]
    good = [r for r in photo_root["rels"] if r != "broken.jpg"]
    assert report.added == len(good) == 22 and report.skipped_existing == 0
    assert [p for p, _ in report.failed] == [str(photo_root["root"].resolve() / "broken.jpg")]
    assert "readable" in report.failed[0][1]
    assert sorted(report.unpositioned) == photo_root["unpositioned"] and len(report.unpositioned) == 5
    assert sorted(snap) == sorted(good)
    for rel, (desc, lat, lon, source) in snap.items():
        np.testing.assert_allclose(desc, standin_descriptor(photo_root["root"] / rel), atol=1e-6)
        if rel in photo_root["expected"]:
            elat, elon, esource = photo_root["expected"][rel]
            assert (source, round(lat, 6), round(lon, 6)) == (esource, round(elat, 6), round(elon, 6)), rel
        else:
            assert lat is None and lon is None and source is None
    info = json.loads((reference["folder"] / "index.json").read_text())
    assert info["model_fingerprint"] == FP and info["dim"] == DIM
    assert info["counts"] == {"images": 22, "positioned": 17}
    with sqlite3.connect(reference["folder"] / "meta.sqlite") as db:
        ((root, zone, letter, east),) = db.execute(
            "SELECT root, zone, zone_letter, easting FROM images WHERE path = ?", (AT_NAME,)
        ).fetchall()
    assert root == str(photo_root["root"].resolve()) and (zone, letter) == (31, "U")
    assert abs(east - 451843.93) < 0.5  # the '@' name's own easting, recomputed from its lat/lon


def test_csv_beats_at_name(photo_root, tmp_path):
    positions = {AT_NAME: (10.0, 20.0)}
    with IndexStore.create(tmp_path / "i", FP, DIM) as store:
        store.add([AT_NAME, EXIF_NAME], photo_root["root"], standin_extract, positions=positions, progress=False)
        rows = {r["path"]: r for r in store.images()}
    assert (rows[AT_NAME]["lat"], rows[AT_NAME]["position_source"]) == (10.0, "csv")
    assert rows[EXIF_NAME]["position_source"] == "exif"


def test_rerun_adds_nothing(photo_root, reference, tmp_path):
    folder = tmp_path / "index"
    shutil.copytree(reference["folder"], folder)
    store, report = build(folder, photo_root)
    store.close()
    assert (report.added, report.skipped_existing, len(report.failed)) == (0, 22, 1)
    assert _same(snapshot(folder), reference["snap"])


def _same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k][0], b[k][0]) and a[k][1:] == b[k][1:] for k in a)


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_index_store import standin_extract, build_args
    from hafloc.index.store import IndexStore
    from hafloc.index.positions import read_positions_csv
    folder, root, csv = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    rels = sys.argv[4:]
    store = IndexStore.open_or_create(folder, *build_args())
    store.add(rels, root, lambda p, n: standin_extract(p, n, delay=0.25),
              positions=read_positions_csv(csv), chunk_size=3, progress=False)
""")


def build_args() -> tuple:
    return (FP, DIM, SearchConfig(), "standin.pt")


def _committed(folder: Path) -> int:
    try:
        with sqlite3.connect(f"file:{folder / 'meta.sqlite'}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_sigkill_midway_then_rerun_equals_uninterrupted(photo_root, reference, tmp_path):
    folder = tmp_path / "index"
    script = tmp_path / "build.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    cmd = [
        sys.executable,
        str(script),
        str(folder),
        str(photo_root["root"]),
        str(photo_root["csv"]),
        *photo_root["rels"],
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _committed(folder) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # land the signal somewhere inside a later chunk, not at a chunk boundary
    assert proc.poll() is None, f"builder ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    partial = _committed(folder)
    assert 6 <= partial < 22, partial  # killed midway: some chunks committed, not all
    assert (
        not (folder / "search.faiss.json").exists() or json.loads((folder / "search.faiss.json").read_text())["n"] != 22
    )

    # a kill between writing a chunk file and committing its rows leaves an orphan file: plant one
    with sqlite3.connect(folder / "meta.sqlite") as db:
        next_chunk = db.execute("SELECT MAX(chunk) FROM images").fetchone()[0] + 1
    np.save(folder / "chunks" / f"chunk_{next_chunk:06d}.npy", np.full((3, DIM), 7.0, np.float32))

    rerun = subprocess.run(cmd, capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert _same(snapshot(folder), reference["snap"])
    with IndexStore.open(folder) as store:
        db_rel = "sub/" + sorted(p.name for p in (photo_root["root"] / "sub").glob("*.jpg"))[0]
        hit = store.search(standin_descriptor(photo_root["root"] / db_rel), k=1)[0]
    assert hit.image == db_rel and hit.similarity > 0.9999


def test_locate_database_image_at_its_own_position(photo_root, reference):
    rels = [r for r, v in photo_root["expected"].items() if v[2] == "csv"][:4]
    descs = np.stack([standin_descriptor(photo_root["root"] / r) for r in rels])
    with IndexStore.open(reference["folder"]) as store:
        out = locate_descriptors(store, descs, [f"q/{r}" for r in rels], k=5)
    json.dumps(out)  # exactly what `hafloc locate --json` prints
    for rel, res in zip(rels, out):
        lat, lon, _ = photo_root["expected"][rel]
        assert set(res) == {"image", "estimate", "calibrated", "radius_m", "matches"} and res["image"] == f"q/{rel}"
        assert res["calibrated"] is False and res["radius_m"] == 25.0
        assert set(res["estimate"]) == {"lat", "lon", "confidence", "verified"}
        assert res["estimate"]["verified"] is False  # global retrieval only: nothing was verified
        assert haversine_m(lat, lon, res["estimate"]["lat"], res["estimate"]["lon"]) < 1.0
        assert 0.0 < res["estimate"]["confidence"] <= 1.0
        assert len(res["matches"]) == 5
        top = res["matches"][0]
        assert set(top) == {"image", "root", "lat", "lon", "similarity", "distance_m", "inliers"}
        assert top["root"] == str(photo_root["root"].resolve()) and top["inliers"] is None
        assert top["image"] == rel and top["similarity"] > 0.9999 and top["distance_m"] < 1.0
        sims = [m["similarity"] for m in res["matches"]]
        assert sims == sorted(sims, reverse=True)


def test_unpositioned_best_match_gives_no_estimate_when_none_positioned(photo_root, reference):
    rel = photo_root["unpositioned"][0]
    with IndexStore.open(reference["folder"]) as store:
        res = locate_descriptors(store, standin_descriptor(photo_root["root"] / rel)[None], [rel], k=1)[0]
    assert res["estimate"] is None
    assert res["matches"] == [
        {
            "image": rel,
            "root": str(photo_root["root"].resolve()),
            "lat": None,
            "lon": None,
            "similarity": pytest.approx(1.0, abs=1e-5),
            "distance_m": None,
            "inliers": None,
        }
    ]


def test_model_mismatch_refused(reference):
    with IndexStore.open(reference["folder"]) as store:
        store.check_model(FP)
        with pytest.raises(ModelMismatchError, match=r"built with model ffffffffffff .*you gave model 0123456789ab"):
            store.check_model("0123456789abcdef", model_path="other.pt")
    with pytest.raises(ModelMismatchError):
        IndexStore.open_or_create(reference["folder"], "0" * 64, DIM)


def test_stale_search_rebuilt_lazily(photo_root, tmp_path):
    folder = tmp_path / "index"
    with IndexStore.create(folder, FP, DIM) as store:
        store.add(photo_root["rels"][:6], photo_root["root"], standin_extract, progress=False)
        store.add(photo_root["rels"][6:9], photo_root["root"], standin_extract, progress=False, rebuild=False)
    assert json.loads((folder / "search.faiss.json").read_text())["n"] == 6
    with IndexStore.open(folder) as store:
        hit = store.search(standin_descriptor(photo_root["root"] / photo_root["rels"][7]), k=1)[0]
    assert hit.image == photo_root["rels"][7]
    assert json.loads((folder / "search.faiss.json").read_text())["n"] == 9


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="not a hafloc index"):
        IndexStore.open(tmp_path)
    bad = tmp_path / "pos.csv"
    bad.write_text("image,lat,lon\na.jpg,north,2\n")
    with pytest.raises(InputError, match=r"pos\.csv: line 2"):
        read_positions_csv(bad)
    bad.write_text("name,latitude\n")
    with pytest.raises(InputError, match="image,lat,lon"):
        read_positions_csv(bad)
    with IndexStore.create(tmp_path / "i", FP, DIM) as store:
        with pytest.raises(ModelMismatchError, match="48-D"):
            store.add(["x.jpg"], tmp_path, lambda p, n: Extracted(n, np.ones((1, 8), np.float32)), progress=False)
        assert len(store) == 0


def test_real_extractor_end_to_end(photo_root, tmp_path):
    """The store with hafloc's own Extractor and a GeM model on the packaged ImageNet backbone."""
    extract = pytest.importorskip("hafloc.descriptors.extract", reason="hafloc.descriptors.extract not written yet")
    from hafloc.descriptors.network import GeoLocNet, ModelConfig
    from hafloc.images.io import load_image
    from hafloc.index.store import extractor_fn

    model = GeoLocNet(ModelConfig.for_method("gem"), pretrained=True).eval()
    extractor = extract.Extractor(model, batch_size=4, max_side=128)
    rels = [r for r in photo_root["rels"] if r.endswith(".jpg") and not r.startswith(("@", "exif"))][:6]
    with IndexStore.create(tmp_path / "i", model.fingerprint(), model.out_dim) as store:
        report = store.add(
            rels + ["broken.jpg"],
            photo_root["root"],
            extractor_fn(extractor),
            positions=read_positions_csv(photo_root["csv"]),
            progress=False,
        )
        assert report.added == 6 and len(report.failed) == 1 and report.failed[0][0].endswith("broken.jpg")
        query = extractor.describe_image(load_image(photo_root["root"] / rels[3]))["descriptor"]
        hits = store.search(query, k=3)
        _, names, desc = store.descriptors()
    # what the store holds for an image is what the extractor gives for it directly
    assert float(desc[names.index(rels[3])] @ query) > 0.999
    assert hits[0].image == rels[3] and hits[0].similarity > 0.999 > hits[1].similarity
    with IndexStore.open(tmp_path / "i") as store:
        store.check_model(model.fingerprint())
        with pytest.raises(ModelMismatchError):
            store.check_model(GeoLocNet(ModelConfig.for_method("gem"), pretrained=False).fingerprint())


def test_positions_csv_repeats_and_unusable_at_names(tmp_path, caplog):
    from hafloc.index.positions import position_from_at_name

    csv_file = tmp_path / "pos.csv"
    csv_file.write_text("image,lat,lon\na.jpg,55.7,13.19\nb.jpg,55.8,13.2\na.jpg,55.7,13.19\n")
    with caplog.at_level("WARNING", logger="hafloc.index.positions"):
        assert read_positions_csv(csv_file) == {"a.jpg": (55.7, 13.19), "b.jpg": (55.8, 13.2)}
    assert "1 row(s) repeat an image already listed with the same position (ignored)" in caplog.text
    csv_file.write_text("image,lat,lon\na.jpg,55.7,13.19\na.jpg,55.9,13.19\n")  # the last one no longer wins
    with pytest.raises(
        InputError,
        match=r"pos\.csv: line 3: 'a\.jpg' has position \(55\.9, 13\.19\) "
        r"but line 2 gives it \(55\.7, 13\.19\)",
    ):
        read_positions_csv(csv_file)
    # '@' names with unusable positions: a ValueError the store reports (image indexed unpositioned)
    with pytest.raises(ValueError, match="lat 999.0 is out of range"):  # the cause eval gives for it
        position_from_at_name("db/@500000@4000000@33@T@999@13.2@@@@@@@@@.jpg")
    with pytest.raises(ValueError):
        position_from_at_name("db/@nan@4000000@33@T@@@@@@@@@@@.jpg")
    assert position_from_at_name("db/@500000@4000000@33@T@55.7@13.19@@@@@@@@@.jpg").lat == 55.7

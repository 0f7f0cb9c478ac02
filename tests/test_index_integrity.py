"""Index integrity (issue 11): the write lock under real concurrent processes, (root, path) keys,
content hashes, the v1 -> v2 migration, upkeep (remove/set-position/verify/compact) and one-line
errors for hostile inputs (non-UTF-8 names, bad '@' positions, damaged files, huge PNGs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hafloc.cli import main
from hafloc.errors import InputError
from hafloc.index.positions import read_positions_csv
from hafloc.index.search import SearchConfig
from hafloc.index.store import IndexStore
from test_cli_index import make_small_model
from test_index_store import DIM, FP, standin_descriptor, standin_extract

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
FAST = ("--backend", "torch", "--no-progress")
NON_UTF8 = os.fsdecode(b"caf\xe9 \xff.jpg")  # Latin-1 bytes: not valid UTF-8


@pytest.fixture(scope="module")
def photos(shared_data) -> list[Path]:
    return sorted((shared_data / "landmarks_mini" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def model(photos, tmp_path_factory) -> Path:
    return make_small_model(photos, tmp_path_factory.mktemp("model") / "small.model")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hafloc: error: "), err
    return lines[0]


def folder_of(photos: list[Path], dest: Path, names: list[str] | None = None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(photos):
        (dest / (names[i] if names else p.name)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest / (names[i] if names else p.name))
    return dest


def stored(index: Path) -> dict[str, np.ndarray]:
    """{absolute path: stored descriptor}, asserting there is one row per file."""
    with IndexStore.open(index) as store:
        _, _, desc = store.descriptors()
        rows = store.images()
    keys = [os.path.join(r["root"], r["path"]) for r in rows]
    assert len(keys) == len(set(keys)), "an image is indexed twice"
    return dict(zip(keys, desc))


def standin_store(folder: Path) -> IndexStore:
    return IndexStore.open_or_create(folder, FP, DIM, SearchConfig(), "standin.pt")


# -- keys, hashes, positions ------------------------------------------------------------------


def test_second_folder_with_the_same_names_is_added_and_shown_with_its_root(photos, tmp_path):
    a = folder_of(photos[:3], tmp_path / "a")
    b = folder_of(photos[3:6], tmp_path / "b", names=[p.name for p in photos[:3]])  # same names, other photos
    with standin_store(tmp_path / "i") as store:
        assert store.add([p.name for p in photos[:3]], a, standin_extract, progress=False).added == 3
        rep = store.add([p.name for p in photos[:3]], b, standin_extract, progress=False)
        assert (rep.added, rep.skipped_existing) == (3, 0)  # was "already indexed 3" when keyed by name alone
        # a nested root does not index a file twice
        assert store.add([f"a/{photos[0].name}"], tmp_path, standin_extract, progress=False).skipped_existing == 1
    got = stored(tmp_path / "i")
    for folder in (a, b):
        for p in folder.iterdir():
            np.testing.assert_allclose(got[str(p.resolve())], standin_descriptor(p), atol=1e-6)
    with IndexStore.open(tmp_path / "i") as store:
        hit = store.search(standin_descriptor(b / photos[0].name), k=1)[0]
    assert (hit.root, hit.image) == (str(b.resolve()), photos[0].name)


def test_true_duplicates_are_reported_and_indexed(photos, tmp_path, model, capsys):
    f = folder_of(photos[:3], tmp_path / "p")
    shutil.copy(photos[0], f / "copy_of_first.jpg")
    shutil.copy(photos[1], f / "sub_copy.jpg")
    code, out, err = run_cli(capsys, "index", "build", f, "--model", model, "--index", tmp_path / "i", *FAST)
    assert code == 0 and "added 5" in out
    assert "warning: 2 image(s) have the same content as another indexed image (indexed anyway)" in err
    assert (
        f"{f.resolve() / photos[0].name} = {f.resolve() / 'copy_of_first.jpg'}" in err
        or f"{f.resolve() / 'copy_of_first.jpg'} = {f.resolve() / photos[0].name}" in err
    )
    with IndexStore.open(tmp_path / "i") as store:
        hashes = [r["sha1"] for r in store.images()]
    assert len(hashes) == 5 and len(set(hashes)) == 3 and all(len(h) == 40 for h in hashes)


@pytest.mark.parametrize(
    "at_name",
    [
        "@0451843.93@5415068.87@31@U@999.0@2.343100@@@@@@@@@.jpg",  # lat 999
        "@0451843.93@5415068.87@31@U@nan@2.343100@@@@@@@@@.jpg",
        "@0451843.93@5415068.87@31@U@48.886700@inf@@@@@@@@@.jpg",
        "@nan@5415068.87@31@U@@@@@@@@@@.jpg",  # no lat/lon, a nan easting in a UTM zone
    ],
)
def test_invalid_at_position_is_indexed_unpositioned_with_a_warning(photos, tmp_path, model, capsys, at_name):
    f = folder_of(photos[:2], tmp_path / "p", names=["good.jpg", at_name])
    argv = ("index", "build", f, "--model", model, "--index", tmp_path / "i", "--chunk-size", "8", *FAST)
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "added 2, already indexed 0, failed 0" in out, err  # the chunk used to be lost
    assert "warning: 1 image(s) have an invalid position and were indexed without one" in err
    assert at_name in err and ("is out of range" in err or "is not a finite number" in err)
    code, out, _ = run_cli(capsys, *argv)  # the rerun used to fail again
    assert code == 0 and "added 0, already indexed 2" in out
    with IndexStore.open(tmp_path / "i") as store:
        assert {r["path"]: r["lat"] for r in store.images()} == {"good.jpg": None, at_name: None}


@pytest.mark.parametrize(
    "at_name, cause",
    [
        ("@abc@5415068.87@31@U@@@@@@@@@@.jpg", "east 'abc' is not a number"),
        ("@nan@5415068.87@31@U@48.8867@2.3431@@@@@@@@.jpg", "east nan is not a finite number"),
    ],
)
def test_at_names_with_unusable_eastings_are_treated_alike_by_index_and_eval(
    photos, tmp_path, model, capsys, at_name, cause
):
    """index build: indexed without a position, warned with the cause; eval: refused with the same cause."""
    split = tmp_path / "ds" / "images" / "test"
    folder_of(photos[:1], split / "queries", names=["@451843.93@5415068.87@31@U@@@@@@@@@@.jpg"])
    folder_of(photos[1:3], split / "database", names=["@451843.93@5415068.87@31@U@@@@@@@@@@.jpg", at_name])
    code, out, err = run_cli(
        capsys, "index", "build", split / "database", "--model", model, "--index", tmp_path / "i", *FAST
    )
    assert code == 0 and "added 2" in out, err
    assert "1 image(s) have an invalid position" in err and f"{at_name}: {cause} in the '@' name" in err
    code, _, err = run_cli(capsys, "eval", "--model", model, "--dataset", tmp_path / "ds", *FAST)
    assert code == 2 and cause in one_line_error(err) and at_name in err


def test_unsupported_images_and_unused_csv_rows_are_reported(photos, tmp_path, model, capsys):
    f = folder_of(photos[:2], tmp_path / "p", names=["a.jpg", "sub/b.jpg"])
    Image.open(photos[0]).resize((32, 24)).save(f / "anim.gif")
    (f / "sub" / "IMG_1.HEIC").write_bytes(b"\0" * 16)
    (f / "notes.txt").write_text("not an image, not reported")
    (f / ".hidden.gif").write_bytes(b"GIF89a")
    csv = tmp_path / "pos.csv"
    csv.write_text("image,lat,lon\na.jpg,1,2\nsub/b.jpg,1,2.0001\ngone.jpg,3,4\nsub/a.jpg,5,6\nold/c.jpg,7,8\n")
    argv = ("index", "build", f, "--model", model, "--index", tmp_path / "i", "--positions", csv, *FAST)
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "added 2, already indexed 0, failed 0" in out and "2 with a position" in out, err
    assert "skipped 2 file(s) of an image type hafloc does not read (.gif, .heic; it reads " in err
    assert "\n  anim.gif\n  sub/IMG_1.HEIC\n" in err and "notes.txt" not in err and ".hidden" not in err
    # 'sub/a.jpg' names no image (the store looks up 'a.jpg' by its relative path, then its bare name)
    assert f"warning: 3 of 5 row(s) of {csv} name no image in {f} (e.g. gone.jpg, sub/a.jpg, old/c.jpg)" in err
    only_gif = folder_of([], tmp_path / "g")
    Image.open(photos[0]).resize((32, 24)).save(only_gif / "x.gif")
    code, _, err = run_cli(capsys, "index", "build", only_gif, "--model", model, "--index", tmp_path / "j", *FAST)
    assert code == 2 and err.strip().endswith("g: no images found (1 skipped, see above)") and "  x.gif" in err


@pytest.mark.parametrize("lat, lon", [("nan", "2"), ("1", "inf"), ("999", "2"), ("-inf", "0")])
def test_positions_csv_impossible_values(photos, tmp_path, model, capsys, lat, lon):
    f = folder_of(photos[:1], tmp_path / "p", names=["a.jpg"])
    (tmp_path / "pos.csv").write_text(f"image,lat,lon\nother.jpg,1,2\na.jpg,{lat},{lon}\n")
    code, _, err = run_cli(
        capsys,
        "index",
        "build",
        f,
        "--model",
        model,
        "--index",
        tmp_path / "i",
        "--positions",
        tmp_path / "pos.csv",
        *FAST,
    )
    assert code == 2 and "pos.csv: line 3: lat/lon out of range" in one_line_error(err)
    assert not (tmp_path / "i").exists()  # refused before anything is written


def test_positions_csv_repeated_rows(tmp_path, caplog):
    csv = tmp_path / "pos.csv"
    csv.write_text("image,lat,lon\na.jpg,1.5,2.5\nb.jpg,3,4\na.jpg,1.5,2.5\na.jpg,1.5,2.5\n")
    assert read_positions_csv(csv) == {"a.jpg": (1.5, 2.5), "b.jpg": (3.0, 4.0)}
    assert "2 row(s) repeat an image already listed with the same position" in caplog.text  # silent before
    csv.write_text("image,lat,lon\na.jpg,1.5,2.5\nb.jpg,3,4\na.jpg,1.6,2.5\n")
    with pytest.raises(InputError, match=r"pos\.csv: line 4: 'a\.jpg' has position \(1\.6, 2\.5\) but line 2"):
        read_positions_csv(csv)  # the last row used to win silently


# -- non-UTF-8 names ---------------------------------------------------------------------------


def test_non_utf8_names_are_indexed_losslessly_and_shown_escaped(photos, tmp_path, model, capsys):
    f = folder_of(photos[:3], tmp_path / "p", names=["plain.jpg", NON_UTF8, "other.jpg"])
    argv = ("index", "build", f, "--model", model, "--index", tmp_path / "i", "--chunk-size", "2", *FAST)
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "added 3, already indexed 0, failed 0" in out, err  # the chunk used to be lost
    assert "caf\\xe9 \\xff.jpg" in err  # listed as unpositioned, escaped
    assert run_cli(capsys, *argv)[1].count("added 0, already indexed 3") == 1
    with sqlite3.connect(tmp_path / "i" / "meta.sqlite") as db:
        raw = {r[0] for r in db.execute("SELECT path FROM images")}
    assert os.fsencode(NON_UTF8) in raw  # the exact bytes of the name
    with IndexStore.open(tmp_path / "i") as store:
        assert NON_UTF8 in {r["path"] for r in store.images()}
    code, out, err = run_cli(capsys, "locate", f / NON_UTF8, "--index", tmp_path / "i", "--json", *FAST)
    assert code == 0, err
    top = json.loads(out)["results"][0]["matches"][0]
    assert top["image"] == NON_UTF8 and top["similarity"] > 0.999
    assert Path(top["root"], top["image"]).read_bytes() == photos[1].read_bytes()  # the name still opens the file
    assert run_cli(capsys, "index", "verify", "--index", tmp_path / "i", "--no-model")[0] == 0
    from fastapi.testclient import TestClient

    from hafloc.serve.app import create_app

    with TestClient(create_app(tmp_path / "i", backend="torch")) as c:  # the server: lossless JSON, thumbnails
        r = c.post("/locate", files={"file": ("q.jpg", photos[1].read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
        top = r.json()["results"][0]["matches"][0]
        assert top["image"] == NON_UTF8 and "\\udce9" in r.text
        assert c.get(f"/thumbnails/{top['id']}").status_code == 200


def test_kml_and_export_hloc_with_a_non_utf8_name(photos, tmp_path, model, capsys):
    """KML escapes the name as CSV does; export-hloc writes its raw bytes, as its HDF5 group is named."""
    import xml.etree.ElementTree as ET

    import h5py

    name = os.fsdecode(b"caf\xe9\xff.jpg")  # no space: hloc's pairs files separate names by one
    f = folder_of(photos[:3], tmp_path / "p", names=["plain.jpg", name, "other.jpg"])
    assert run_cli(capsys, "index", "build", f, "--model", model, "--index", tmp_path / "i", *FAST)[0] == 0
    kml = tmp_path / "where.kml"
    code, _, err = run_cli(capsys, "locate", f, "--index", tmp_path / "i", "--format", "kml", "-o", kml, *FAST)
    assert code == 0, err  # was a UnicodeEncodeError traceback
    ns = "{http://www.opengis.net/kml/2.2}"
    root = ET.parse(kml).getroot()
    names = [e.text for e in root.iter(f"{ns}name")]
    tops = [d.find(f"{ns}value").text for d in root.iter(f"{ns}Data") if d.get("name") == "top_image"]
    escaped = "caf\\udce9\\udcff.jpg"  # the bytes can be told back, as in JSON and CSV
    assert str(f / escaped) in names and escaped in tops  # the query and its best match
    code, out, err = run_cli(capsys, "locate", f, "--index", tmp_path / "i", "--format", "csv", *FAST)
    assert code == 0 and str(f / escaped) in out
    q = folder_of(photos[1:2], tmp_path / "q", names=[name.replace("caf", "query-")])
    out = tmp_path / "hloc"
    argv = ("index", "export-hloc", "--index", tmp_path / "i", "--queries", q, "--output", out, "--top-k", "2")
    code, _, err = run_cli(capsys, *argv, *FAST)
    assert code == 0, err  # was a UnicodeEncodeError traceback
    raw = os.fsencode(name)
    assert raw in (out / "db.txt").read_bytes().split(b"\n")
    assert (out / "queries.txt").read_bytes() == os.fsencode(name.replace("caf", "query-")) + b"\n"
    pairs = [line.split(b" ") for line in (out / "pairs-query-hafloc2.txt").read_bytes().split(b"\n")]
    with h5py.File(out / "global-feats-hafloc.h5", "r") as h:
        keys = {k if isinstance(k, bytes) else k.encode() for k in h.keys()}
    assert raw in keys and all(q in keys and d in keys for q, d in pairs)  # every pair name opens a group


def test_extract_h5_with_a_non_utf8_name(photos, tmp_path, model, capsys):
    import h5py

    f = folder_of(photos[:2], tmp_path / "p", names=["plain.jpg", NON_UTF8])
    code, out, err = run_cli(capsys, "extract", f, "--model", model, "--output", tmp_path / "x.h5", *FAST)
    assert code == 0 and "2 descriptors" in out, err  # was a UnicodeEncodeError traceback
    with h5py.File(tmp_path / "x.h5", "r") as h:
        assert set(h.keys()) == {"plain.jpg", os.fsencode(NON_UTF8)}  # the raw bytes, as the file system has them
        assert h[os.fsencode(NON_UTF8)]["global_descriptor"].shape == (load_dim(model),)


def load_dim(model: Path) -> int:
    from hafloc.descriptors.modelfile import load_model

    return load_model(model).out_dim


# -- damaged inputs: one line naming the file ---------------------------------------------------


@pytest.fixture(scope="module")
def small_index(photos, model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("small_index")
    db = folder_of(photos[:4], root / "db")
    assert main(["index", "build", str(db), "--model", str(model), "--index", str(root / "index"), *FAST]) == 0
    return {"db": db, "index": root / "index", "model": model}


def test_empty_model_file(small_index, tmp_path, capsys):
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    code, _, err = run_cli(
        capsys, "index", "build", small_index["db"], "--model", empty, "--index", tmp_path / "i", *FAST
    )
    assert code == 2 and one_line_error(err).endswith("empty.model: empty model file (0 bytes)")  # was IndexError


class _Code:
    """An object whose unpickling would run code: a model file must never load it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unreadable_model_files_get_hafloc_words_not_torch_advice(small_index, tmp_path, capsys):
    import torch

    good = small_index["model"].read_bytes()
    objects = tmp_path / "objects.model"
    torch.save({"format": "hafloc-model", "x": _Code()}, objects)
    cases = {
        "junk.model": (b"not a model at all", "not a zip archive, as torch.save writes"),
        "pickle.model": (b"\x80\x04N.", "not a zip archive, as torch.save writes"),
        "trunc.model": (good[: len(good) // 2], "damaged or truncated archive"),
        "objects.model": (objects.read_bytes(), "it holds Python objects, not only tensors and plain data"),
    }
    for name, (data, cause) in cases.items():
        (tmp_path / name).write_bytes(data)
        code, out, err = run_cli(capsys, "model", "info", tmp_path / name)
        line = one_line_error(err)
        assert code == 2 and line.startswith(f"hafloc: error: {tmp_path / name}: not a hafloc model file ("), err
        assert cause in line and "weights_only" not in line and "pwned" not in out + err


@pytest.mark.parametrize(
    "content, cause",
    [
        ("[1, 2]", "not a JSON object"),
        ('{"format": "hafloc-index", "model_fingerprint": "ab", "search": {}}', "field 'dim' is missing"),
        ('{"format": "hafloc-index", "dim": 8}', "field 'model_fingerprint' is missing"),
        (
            '{"format": "hafloc-index", "dim": "8", "model_fingerprint": "ab"}',
            "field 'dim' is missing or not a positive",
        ),
    ],
)
def test_bad_index_json(small_index, tmp_path, capsys, content, cause):
    idx = tmp_path / "index"
    shutil.copytree(small_index["index"], idx)
    (idx / "index.json").write_text(content)
    for argv in (
        ("index", "info", idx),
        ("locate", small_index["db"], "--index", idx, *FAST),
        ("index", "add", small_index["db"], "--index", idx, *FAST),
    ):
        code, _, err = run_cli(capsys, *argv)
        line = one_line_error(err)
        assert code == 2 and f"{idx / 'index.json'}: " in line and cause in line


def test_damaged_meta_sqlite(small_index, tmp_path, capsys):
    from hafloc.serve.app import create_app

    idx = tmp_path / "index"
    shutil.copytree(small_index["index"], idx)
    (idx / "meta.sqlite").write_bytes(np.random.default_rng(0).bytes(8192))
    for argv in (
        ("index", "info", idx),
        ("locate", small_index["db"], "--index", idx, *FAST),
        ("index", "add", small_index["db"], "--index", idx, *FAST),
        ("index", "remove", "--missing", "--index", idx),
    ):
        code, _, err = run_cli(capsys, *argv)
        line = one_line_error(err)
        assert code == 2 and f"{idx / 'meta.sqlite'}: damaged index database" in line
    with pytest.raises(InputError, match="meta.sqlite: damaged index database"):
        create_app(idx, backend="torch")  # `hafloc serve` prints it as one line
    code, out, _ = run_cli(capsys, "index", "verify", "--index", idx, "--json", "--no-model")
    rep = json.loads(out)
    assert code == 1 and not rep["ok"]
    assert [c["status"] for c in rep["checks"] if c["check"] == "meta.sqlite"] == ["damage"]


# -- upkeep ------------------------------------------------------------------------------------


def test_remove_set_position_compact_verify(photos, tmp_path, capsys):
    f = folder_of(
        photos[:6], tmp_path / "p", names=[f"sub/{p.name}" if i % 2 else p.name for i, p in enumerate(photos[:6])]
    )
    rels = sorted(p.relative_to(f).as_posix() for p in f.rglob("*.jpg"))
    idx = tmp_path / "i"
    with standin_store(idx) as store:
        store.add(rels, f, standin_extract, chunk_size=2, progress=False)
    assert run_cli(capsys, "index", "verify", "--index", idx, "--no-model")[0] == 0
    # remove a folder and a file; the file of another goes missing
    top = sorted(r for r in rels if "/" not in r)
    code, out, err = run_cli(capsys, "index", "remove", "--index", idx, f / "sub", f / top[0], f / "nope.jpg")
    assert code == 1 and "removed 4 image(s)" in out and "nope.jpg: not in the index" in err  # the rest removed
    assert "1 of 3 named target(s) not in the index" in err
    (f / top[1]).unlink()
    code, out, _ = run_cli(capsys, "index", "remove", "--index", idx, "--missing")
    assert code == 0 and "removed 1 image(s) (1 whose file no longer exists)" in out
    with IndexStore.open(idx) as store:
        assert [r["path"] for r in store.images()] == [top[2]]
        assert store.search(standin_descriptor(photos[1]), k=5)[0].image == top[2]  # search rebuilt: 1 image
    code, out, _ = run_cli(capsys, "index", "verify", "--index", idx, "--json", "--no-model")
    checks = {c["check"]: c for c in json.loads(out)["checks"]}
    assert code == 0 and "1 stale row(s)" in checks["chunks"]["detail"]  # the chunk shared with the live image
    assert (
        checks["orphan files"]["status"] == "warning"
        and "2 chunk(s) no row points at" in checks["orphan files"]["detail"]
    )
    # set-position: validated, UTM recomputed
    code, _, err = run_cli(capsys, "index", "set-position", "--index", idx, f / top[2], "91", "2")
    assert code == 2 and "lat must lie in [-90, 90]" in one_line_error(err)
    code, out, _ = run_cli(capsys, "index", "set-position", "--index", idx, f / top[2], "-33.9", "-18.4")
    assert code == 0
    with IndexStore.open(idx) as store:
        assert [(r["lat"], r["lon"], r["zone"]) for r in store.images()] == [(-33.9, -18.4, 27)]
    code, out, _ = run_cli(capsys, "index", "set-position", "--index", idx, f / top[2], "48.8867", "2.3431")
    assert code == 0
    with IndexStore.open(idx) as store:
        (row,) = store.images()
    assert (row["lat"], row["lon"], row["position_source"], row["zone"], row["zone_letter"]) == (
        48.8867,
        2.3431,
        "manual",
        31,
        "U",
    )
    assert abs(row["easting"] - 451843.93) < 1.0
    assert json.loads((idx / "index.json").read_text())["counts"] == {"images": 1, "positioned": 1}
    # compact: only the live row remains on disk, answers unchanged
    before = stored(idx)
    code, out, _ = run_cli(capsys, "index", "compact", "--index", idx)
    assert code == 0 and "dropped 1 stale row(s), deleted 2 chunk(s) no image uses" in out
    chunk_rows = sum(np.load(p).shape[0] for p in (idx / "chunks").glob("chunk_*.npy"))
    assert chunk_rows == 1
    after = stored(idx)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in after)
    code, out, _ = run_cli(capsys, "index", "verify", "--index", idx, "--json", "--no-model")
    assert code == 0 and json.loads(out)["warnings"] == 0


def test_verify_finds_damage(small_index, tmp_path, capsys):
    idx = tmp_path / "index"
    shutil.copytree(small_index["index"], idx)
    code, out, _ = run_cli(capsys, "index", "verify", "--index", idx)
    assert code == 0 and out.strip().endswith(": OK"), out
    np.save(idx / "chunks" / "chunk_000099.npy", np.zeros((2, 3), np.float32))  # orphan: a warning
    code, out, _ = run_cli(capsys, "index", "verify", "--index", idx, "--json")
    rep = json.loads(out)
    assert code == 0 and rep["ok"] and rep["warnings"] == 1
    chunk = next((idx / "chunks").glob("chunk_000001.npy"))
    np.save(chunk, np.zeros((1, 5), np.float32))  # wrong shape
    code, out, _ = run_cli(capsys, "index", "verify", "--index", idx)
    assert code == 1 and "damage   chunks" in out and "expected float32 (N, " in out
    chunk.unlink()  # rows pointing at a missing chunk
    code, out, _ = run_cli(capsys, "index", "verify", "--index", idx)
    assert code == 1 and "whose descriptors file is missing" in out


def _overwrite_row(chunk: Path, row: int, seed: int = 0) -> None:
    """Replace one descriptor with other valid ones: finite, unit length, right shape and dtype."""
    a = np.load(chunk)
    v = np.random.default_rng(seed).standard_normal(a.shape[1]).astype(a.dtype)
    a[row] = v / np.linalg.norm(v)
    np.save(chunk, a)


def _checks(capsys, idx: Path) -> tuple[int, dict[str, dict]]:
    code, out, _ = run_cli(capsys, "index", "verify", "--index", idx, "--json", "--no-model")
    return code, {c["check"]: c for c in json.loads(out)["checks"]}


def test_verify_finds_a_descriptor_overwritten_with_valid_floats(small_index, tmp_path, capsys):
    idx = tmp_path / "index"
    shutil.copytree(small_index["index"], idx)
    code, checks = _checks(capsys, idx)
    assert code == 0 and checks["checksums"] == {
        "check": "checksums",
        "status": "ok",
        "detail": "1 chunk file(s) match their checksums",
    }
    assert checks["search"]["status"] == "ok"
    _overwrite_row(idx / "chunks" / "chunk_000001.npy", 2)
    code, checks = _checks(capsys, idx)
    assert code == 1 and checks["chunks"]["status"] == "ok"  # shape, dtype and values all plausible
    assert checks["checksums"]["status"] == "damage" and "chunk_000001.npy" in checks["checksums"]["detail"]
    assert checks["search"]["status"] == "damage"
    assert (
        "1 of 4 image(s) have other descriptors in the chunks than in the search structure"
        in (checks["search"]["detail"])
    )
    assert "row 2 of chunk_000001.npy" in checks["search"]["detail"]
    code, out, _ = run_cli(capsys, "index", "verify", "--index", idx, "--no-model")
    assert code == 1 and "DAMAGED (2 check(s))" in out


def test_verify_an_index_written_before_checksums(photos, tmp_path, capsys):
    f = folder_of(photos[:6], tmp_path / "p")
    names = sorted(p.name for p in f.iterdir())
    idx = tmp_path / "i"
    with standin_store(idx) as store:
        store.add(names[:4], f, standin_extract, chunk_size=2, progress=False)
    with sqlite3.connect(idx / "meta.sqlite") as db:
        db.execute("DROP TABLE chunk_sums")  # as the code before checksums wrote it
    code, out, _ = run_cli(capsys, "index", "verify", "--index", idx, "--no-model")
    assert code == 0 and out.strip().endswith(": OK"), out  # verifies as before
    assert "skipped  checksums     not available: the 2 chunk file(s) were written before" in out
    # the next write gives it the table: its new chunk has a checksum, the older ones are said to lack one
    with standin_store(idx) as store:
        store.add(names[4:], f, standin_extract, chunk_size=2, progress=False)
    code, checks = _checks(capsys, idx)
    assert code == 0 and checks["checksums"] == {
        "check": "checksums",
        "status": "ok",
        "detail": "1 chunk file(s) match their checksums; 2 older chunk file(s) have none",
    }
    # an older chunk overwritten: the search structure still holds the vectors it had
    _overwrite_row(idx / "chunks" / "chunk_000001.npy", 1)
    code, checks = _checks(capsys, idx)
    assert code == 1 and checks["search"]["status"] == "damage" and checks["checksums"]["status"] == "ok"
    assert "row 1 of chunk_000001.npy" in checks["search"]["detail"]


def standin_local_index(photos: list[Path], tmp_path: Path) -> Path:
    """4 photos, 2 per chunk, with standin descriptors and a few random keypoints each (local_*.h5)."""
    from hafloc.local import LocalFeatures

    def extract(paths, names):
        res = standin_extract(paths, names)
        rng = np.random.default_rng(len(names))
        res.local = {
            n: LocalFeatures(rng.uniform(0, 60, (50, 2)), rng.standard_normal((50, 32)), np.ones(50), (64, 64))
            for n in res.names
        }
        return res

    f = folder_of(photos[:4], tmp_path / "p")
    idx = tmp_path / "i"
    with IndexStore.open_or_create(idx, FP, DIM, SearchConfig(), "standin.pt", local={"extractor": "standin"}) as store:
        store.add(sorted(p.name for p in f.iterdir()), f, extract, chunk_size=2, progress=False)
    return idx


def test_verify_reports_a_missing_local_features_group(photos, tmp_path, capsys):
    import h5py

    idx = standin_local_index(photos, tmp_path)
    assert _checks(capsys, idx)[0] == 0
    local = idx / "chunks" / "local_000002.h5"
    with h5py.File(local, "a") as h5:
        gone = sorted(h5.keys())[0]
        del h5[gone]
    code, checks = _checks(capsys, idx)  # was exit 2, a one-line error and no report
    assert code == 1 and checks["chunks"]["status"] == "damage"
    assert f"local_000002.h5: no local features for '{gone}'" in checks["chunks"]["detail"]
    assert checks["checksums"]["status"] == "damage" and "local_000002.h5" in checks["checksums"]["detail"]
    code, out, err = run_cli(capsys, "index", "verify", "--index", idx, "--no-model")
    assert code == 1 and "damage   chunks" in out and "DAMAGED" in out and not err


def test_info_counts_local_features_on_disk_in_one_unit_convention(photos, tmp_path, capsys):
    idx = standin_local_index(photos, tmp_path)
    code, out, _ = run_cli(capsys, "index", "info", idx, "--json")
    info = json.loads(out)
    fp = info["footprint"]
    local = sum(p.stat().st_size for p in (idx / "chunks").glob("local_*.h5"))
    desc = sum(p.stat().st_size for p in (idx / "chunks").glob("chunk_*.npy"))
    assert code == 0 and fp["actual"]["local_bytes"] == local > 0 and fp["actual"]["descriptor_bytes"] == desc
    assert fp["actual"]["disk_bytes"] >= desc + local + (idx / "meta.sqlite").stat().st_size
    # exact search over 4 float32 descriptors, plus the local features at their measured size per image
    assert fp["estimated"]["disk_bytes"] == 4 * DIM * 4 + round(4 * info["local"]["bytes_per_image"])
    code, out, _ = run_cli(capsys, "index", "info", idx)
    units = re.findall(r"\d (\w*B)\b", out)
    assert code == 0 and units and set(units) <= {"B", "kB", "MB", "GB", "TB"}, out  # decimal, never KB/KiB
    assert f"of which local features {local / 1000:.1f} kB)" in out  # 10-100 kB here
    per_image = info["local"]["bytes_per_image"]
    assert f"; {per_image / 1000:.1f} kB per image" in out  # was bytes / 1024 labelled KB


def test_info_report_on_an_uncalibrated_index_writes_what_it_can(photos, tmp_path, capsys):
    f = folder_of(photos[:4], tmp_path / "p")
    with standin_store(tmp_path / "i") as store:
        store.add(sorted(p.name for p in f.iterdir()), f, standin_extract, progress=False)
    code, out, err = run_cli(capsys, "index", "info", tmp_path / "i", "--report", tmp_path / "report")
    page = tmp_path / "report" / "index.html"
    assert code == 0 and f"report     {page}" in out  # was exit 2: "not calibrated (for this model)"
    assert err.count("\n") == 1 and err.startswith("hafloc: note: ") and "is not calibrated" in err
    assert "'hafloc index calibrate --index" in err
    text = page.read_text()
    assert "images     4 (0 with a position, 4 without)" in text and "Not calibrated" in text
    code, out, err = run_cli(capsys, "index", "info", tmp_path / "i", "--json", "--report", tmp_path / "r2")
    assert code == 0 and json.loads(out)["report"] == str(tmp_path / "r2" / "index.html") and "not calibrated" in err


def test_v1_index_is_read_and_migrated_by_its_first_writer(photos, tmp_path):
    """An index as the VERSION 1 code wrote it (UNIQUE(path), no sha1)."""
    f = folder_of(photos[:4], tmp_path / "p")
    g = folder_of(photos[4:6], tmp_path / "q", names=[p.name for p in photos[:2]])  # names clash with f's
    idx = tmp_path / "i"
    (idx / "chunks").mkdir(parents=True)
    names = [p.name for p in photos[:4]]
    np.save(idx / "chunks" / "chunk_000001.npy", np.stack([standin_descriptor(f / n) for n in names]))
    with sqlite3.connect(idx / "meta.sqlite") as db:
        db.executescript("""
            CREATE TABLE IF NOT EXISTS images (
                id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL UNIQUE, root TEXT NOT NULL,
                lat REAL, lon REAL, easting REAL, northing REAL, zone INTEGER, zone_letter TEXT,
                position_source TEXT, added_at TEXT NOT NULL, chunk INTEGER NOT NULL, row INTEGER NOT NULL);
            CREATE INDEX IF NOT EXISTS images_chunk ON images(chunk);""")
        db.executemany(
            "INSERT INTO images (path, root, lat, lon, position_source, added_at, chunk, row) VALUES (?,?,?,?,?,?,?,?)",
            [
                (n, str(f.resolve()), 10.0 + i, 20.0, "csv", "2026-01-01T00:00:00+00:00", 1, i)
                for i, n in enumerate(names)
            ],
        )
    (idx / "index.json").write_text(
        json.dumps(
            {
                "format": "hafloc-index",
                "version": 1,
                "model_fingerprint": FP,
                "model_path": None,
                "dim": DIM,
                "search": SearchConfig().to_dict(),
                "counts": {"images": 4, "positioned": 4},
            }
        )
    )
    with IndexStore.open(idx) as store:  # a reader: works on the old schema, changes nothing
        hit = store.search(standin_descriptor(f / names[2]), k=1)[0]
        assert (hit.image, hit.lat) == (names[2], 12.0)
        assert [r["sha1"] for r in store.images()] == [None] * 4
    with sqlite3.connect(idx / "meta.sqlite") as db:
        assert "sha1" not in {r[1] for r in db.execute("PRAGMA table_info(images)")}
    with standin_store(idx) as store:  # the first writer migrates
        rep = store.add([p.name for p in g.iterdir()], g, standin_extract, progress=False)
        assert rep.added == 2  # same names, another root: the v1 UNIQUE(path) refused these
        rows = store.images()
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[0]["added_at"] == "2026-01-01T00:00:00+00:00"
    assert json.loads((idx / "index.json").read_text())["version"] == 2
    got = stored(idx)
    for p in list(f.iterdir()) + list(g.iterdir()):
        np.testing.assert_allclose(got[str(p.resolve())], standin_descriptor(p), atol=1e-6)


# -- the write lock with real processes --------------------------------------------------------


def test_second_writer_waits_then_fails_with_one_line(small_index, tmp_path, capsys):
    idx = tmp_path / "index"
    shutil.copytree(small_index["index"], idx)
    holder = IndexStore.open(idx)
    with holder._writing():  # another writer at work (a separate lock, as in another process)
        code, _, err = run_cli(
            capsys, "index", "add", small_index["db"], "--index", idx, "--lock-timeout", "0.5", *FAST
        )
        assert code == 2
        assert f"waiting for the index lock held by pid {os.getpid()}" in err
        assert (
            f"{idx}: gave up after 0.5 s waiting for the index lock held by pid {os.getpid()}" in err.splitlines()[-1]
        )
        # readers go on while it writes
        assert run_cli(capsys, "index", "info", idx)[0] == 0
        assert run_cli(capsys, "locate", small_index["db"], "--index", idx, *FAST)[0] == 0
    holder.close()
    code, out, _ = run_cli(capsys, "index", "add", small_index["db"], "--index", idx, "--lock-timeout", "0", *FAST)
    assert code == 0 and "already indexed 4" in out


def _single_process_descriptors(model: Path, files: list[Path]) -> dict[str, np.ndarray]:
    from hafloc.descriptors.extract import Extractor
    from hafloc.descriptors.modelfile import load_model

    res = Extractor(load_model(model), backend="torch", batch_size=1).extract_paths(
        files, [str(p.resolve()) for p in files], progress=False
    )
    assert not res.failures
    return dict(zip(res.names, res.descriptors))


def test_three_concurrent_builds_of_different_folders(photos, model, tmp_path):
    """Used to leave images holding another image's descriptor (chunk ids taken outside any lock)."""
    folders = [folder_of(photos[4 * i : 4 * i + 4], tmp_path / f"f{i}") for i in range(3)]
    idx = tmp_path / "index"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hafloc",
                "index",
                "build",
                str(f),
                "--model",
                str(model),
                "--index",
                str(idx),
                "--chunk-size",
                "1",
                "--batch-size",
                "1",
                *FAST,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        for f in folders
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]
        assert b"added 4, already indexed 0, failed 0" in out
    got = stored(idx)
    files = [p for f in folders for p in sorted(f.iterdir())]
    want = _single_process_descriptors(model, files)
    assert sorted(got) == sorted(want) and len(got) == 12
    keys = sorted(want)
    sims = np.stack([got[k] for k in keys]) @ np.stack([want[k] for k in keys]).T
    # each stored descriptor is its own file's, not another image's
    assert (sims.argmax(1) == np.arange(len(keys))).all() and sims.diagonal().min() > 0.9999
    for k in keys:
        np.testing.assert_allclose(got[k], want[k], atol=1e-4, err_msg=k)
    assert IndexStore.open(idx).search(want[str(files[7].resolve())], k=1)[0].path == files[7].resolve()


def test_two_concurrent_adds_of_the_same_folder(small_index, photos, tmp_path):
    """Used to end in a sqlite3.IntegrityError traceback."""
    idx = tmp_path / "index"
    shutil.copytree(small_index["index"], idx)
    f = folder_of(photos[:8], tmp_path / "p")
    cmd = [sys.executable, "-m", "hafloc", "index", "add", str(f), "--index", str(idx), "--chunk-size", "1", *FAST]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]
    summary = sorted(o.decode().strip().splitlines()[-1].split(": ", 1)[1].split(";")[0] for o, _ in outs)
    assert summary == ["added 0, already indexed 8, failed 0", "added 8, already indexed 0, failed 0"]
    got = stored(idx)
    assert len(got) == 12  # 4 from the fixture's folder + 8, each once


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from test_index_store import standin_extract
from hafloc.index.store import IndexStore
from hafloc.index.search import SearchConfig
folder, root, rels = sys.argv[1], sys.argv[2], sys.argv[3:]
store = IndexStore.open_or_create(folder, {fp!r}, {dim}, SearchConfig(), "standin.pt", lock_timeout=0)
store.add(rels, root, lambda p, n: standin_extract(p, n, delay=0.2), chunk_size=1, progress=False)
"""


def test_kill_9_while_holding_the_lock_then_rerun_is_complete(photos, tmp_path):
    f = folder_of(photos[:10], tmp_path / "p")
    rels = sorted(p.name for p in f.iterdir())
    script = tmp_path / "add.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), fp=FP, dim=DIM))
    idx = tmp_path / "index"
    cmd = [sys.executable, str(script), str(idx), str(f), *rels]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 60
    while _committed(idx) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    owner = json.loads((idx / ".write.lock.owner").read_text())
    assert owner["pid"] == proc.pid  # it holds the lock
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert 3 <= _committed(idx) < 10
    # the dead holder's lock file stays behind; the rerun does not wait for it (lock_timeout=0)
    rerun = subprocess.run(cmd, capture_output=True, timeout=120, env=ENV)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    ref = tmp_path / "ref"
    with standin_store(ref) as store:
        store.add(rels, f, standin_extract, chunk_size=1, progress=False)
    a, b = stored(idx), stored(ref)
    assert a.keys() == b.keys() and len(a) == 10 and all(np.array_equal(a[k], b[k]) for k in a)
    assert not list((idx / "chunks").glob(".*.partial*"))


def _committed(index: Path) -> int:
    try:
        with sqlite3.connect(f"file:{index / 'meta.sqlite'}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
    except sqlite3.Error:
        return 0


# -- the server: pixels, not bytes --------------------------------------------------------------


def test_server_refuses_a_small_png_of_many_pixels_and_drafts_big_jpegs(small_index, photos, tmp_path):
    import io

    from fastapi.testclient import TestClient

    from hafloc.images.io import load_image
    from hafloc.serve.app import DRAFT_FACTOR, create_app, decode_upload

    buf = io.BytesIO()
    Image.new("1", (10000, 11900), 1).save(buf, format="PNG")  # ~119 MP in a small file
    png = buf.getvalue()
    assert len(png) < 200_000
    with Image.open(photos[0]) as im:  # a 27 MP JPEG: accepted, decoded at a reduced DCT scale
        big = im.convert("RGB").resize((6000, 4500), Image.BILINEAR)
    big_path = tmp_path / "big.jpg"
    big.save(big_path, quality=80)
    with TestClient(create_app(small_index["index"], backend="torch")) as c:
        r = c.post("/locate", files={"file": ("huge.png", png, "image/png")})
        assert r.status_code == 413, r.text  # was decoded: ~4 s and ~1 GB per request
        assert r.json()["detail"] == "huge.png: image too large (10000x11900 = 119.0 MP; the limit is 40 MP)"
        assert c.get("/health").json()["max_pixels"] == 40_000_000
        r = c.post("/locate", files={"file": ("big.jpg", big_path.read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
        max_side = c.app.state.locator.extractor.max_side
    img = decode_upload(big_path.read_bytes(), "big.jpg", max_side)
    assert max(img.size) < 6000 and max(img.size) >= DRAFT_FACTOR * max_side  # drafted, still >= 4x the model's input
    assert img.size[0] / img.size[1] == pytest.approx(6000 / 4500, rel=0.01)
    small = load_image(photos[0], max_side=max_side)  # below DRAFT_MIN_PIXELS: decoded exactly as before
    assert np.array_equal(np.asarray(small), np.asarray(load_image(photos[0])))
    with TestClient(create_app(small_index["index"], backend="torch", max_pixels=1_000_000)) as c:
        r = c.post("/locate", files={"file": ("big.jpg", big_path.read_bytes(), "image/jpeg")})
        assert r.status_code == 413 and "the limit is 1 MP" in r.json()["detail"]

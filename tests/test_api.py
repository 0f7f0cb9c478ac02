"""The public Python API (``hafloc.__all__``) on real photos with a small real model: it gives what
the command line gives, and the API page documents every public name."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hafloc
from hafloc.cli import main
from hafloc.datasets.detect import load_dataset
from hafloc.datasets.geo import haversine_m
from hafloc.errors import HaflocError, InputError
from hafloc.metrics.evaluate import evaluate as evaluate_dataset
from layouts import gardens_at
from test_cli_index import N_DB, make_photo_db, make_small_model

REPO = Path(__file__).resolve().parents[1]
PUBLIC = {"Index", "LocateResult", "load_model", "extract", "ExtractResult", "evaluate", "EvalResult", "__version__"}


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data) -> dict:
    root = tmp_path_factory.mktemp("api")
    data = make_photo_db(shared_data / "landmarks_mini" / "images", root)
    data["model"] = make_small_model(sorted(data["db"].glob("*.jpg")), root / "small.model")
    data["index"] = root / "index"
    with hafloc.Index.build(
        data["db"], data["model"], data["csv"], index=data["index"], chunk_size=5, backend="torch"
    ) as index:
        assert len(index) == N_DB
    return data


def test_the_public_names_are_all_and_load_on_first_use():
    assert set(hafloc.__all__) == PUBLIC
    for name in hafloc.__all__:
        assert getattr(hafloc, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'IndexStore'"):
        hafloc.IndexStore  # noqa: B018  (internals live in submodules)
    # importing the package (as every submodule import does) stays light: no torch until asked
    code = "import sys, hafloc; assert 'torch' not in sys.modules; hafloc.Index; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_api_page_opens_with_every_public_name():
    text = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    first_internal = text.index("::: hafloc.index.store")
    for name in hafloc.__all__:
        if name != "__version__":
            assert f"hafloc.{name}" in text[:first_internal], f"docs/api.md does not document hafloc.{name} first"
    assert "<!-- runnable -->" in text[:first_internal]  # the worked example, run by tests/test_docs.py


def test_locate_from_python_is_what_the_command_line_prints(built, capsys):
    query = sorted(built["db"].glob("*.jpg"))[3]
    assert main(["locate", str(query), "--index", str(built["index"]), "--json", "--no-progress"]) == 0
    cli = json.loads(capsys.readouterr().out)["results"][0]
    with hafloc.Index.open(built["index"]) as index:
        res = index.locate(query)
        img = index.locate(Image.open(query))
    assert res.to_dict() == cli
    lat, lon = built["positions"][query.name]
    assert (res.lat, res.lon) == (cli["estimate"]["lat"], cli["estimate"]["lon"])
    assert abs(res.lat - lat) < 1e-3 and abs(res.lon - lon) < 1e-3  # a database photo finds its own place
    assert res.matches[0]["image"] == query.name and f"lat={res.lat}" in str(res)
    # a decoded photo is described the same way as its file
    assert [m["id"] for m in img.matches] == [m["id"] for m in res.matches]
    # the same estimate from the one-liner the issue asks for
    code = f"import hafloc; print(hafloc.Index.open({str(built['index'])!r}).locate({str(query)!r}).to_dict())"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO).stdout
    assert repr(cli["estimate"]) in out


def test_locate_errors_are_one_line(built, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with hafloc.Index.open(built["index"]) as index:
        with pytest.raises(InputError, match="broken.jpg"):
            index.locate(bad)
        with pytest.raises(InputError, match="no such file"):
            index.locate(tmp_path / "missing.jpg")
        with pytest.raises(HaflocError, match="re-ranking needs local features"):
            index.locate(sorted(built["db"].glob("*.jpg"))[0], rerank=5)
        with pytest.raises(HaflocError, match="top_k"):
            index.locate(sorted(built["db"].glob("*.jpg"))[0], top_k=0)


def test_add_indexes_new_photos_once(built, tmp_path):
    shutil.copytree(built["index"], tmp_path / "index")
    more = tmp_path / "more"
    more.mkdir()
    extra = sorted(built["db"].glob("*.jpg"))  # the same photos, under other names
    for p in extra[:3]:
        shutil.copy(p, more / f"copy_{p.name}")
    with hafloc.Index.open(tmp_path / "index") as index:
        first = index.add(more, {f"copy_{extra[0].name}": (10.0, 20.0)})
        again = index.add(more)
        assert (first.added, again.added, again.skipped_existing) == (3, 0, 3)
        assert len(index) == N_DB + 3
        hit = index.locate(more / f"copy_{extra[0].name}", top_k=2)
        assert {m["image"] for m in hit.matches} == {extra[0].name, f"copy_{extra[0].name}"}


def test_no_model_means_the_shipped_default(built, tmp_path):
    default = hafloc.load_model()
    assert default.meta["card"]["metrics"] and hafloc.load_model("default").fingerprint() == default.fingerprint()
    with hafloc.Index.build(built["db"], index=tmp_path / "idx") as index:
        assert index.model.fingerprint() == default.fingerprint()
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["model_path"] == "default"
    assert hafloc.load_model(built["model"]).fingerprint() == hafloc.load_model(str(built["model"])).fingerprint()


def test_extract_describes_files_and_folders(built):
    photos = sorted(built["db"].glob("*.jpg"))
    model = hafloc.load_model(built["model"])
    res = hafloc.extract(model, built["db"], backend="torch")
    assert res.names == [str(p) for p in photos] and not res.failures
    assert res.descriptors.shape == (N_DB, model.out_dim)
    assert np.allclose(np.linalg.norm(res.descriptors, axis=1), 1.0, atol=1e-4)
    one = hafloc.extract(built["model"], [photos[4], photos[1]], backend="torch")
    assert one.names == [str(photos[4]), str(photos[1])]
    assert np.allclose(one.descriptors, res.descriptors[[4, 1]], atol=1e-5)
    with hafloc.Index.open(built["index"]) as index:
        assert index.model.fingerprint() == model.fingerprint()


def test_evaluate_scores_a_dataset_folder(built, shared_data, tmp_path):
    folder = gardens_at(shared_data, tmp_path / "gardens")
    res = hafloc.evaluate(built["model"], folder, cache_dir=False)
    ds = load_dataset(folder)
    ref = evaluate_dataset(hafloc.load_model(built["model"]), ds, cache_dir=False, progress=False)
    keys = [k for k in res if re.fullmatch(r"recall@\d+", k)]
    assert keys and all(res[k] == ref[k] for k in keys)
    assert res["num_queries"] == ds.num_q


def test_near_within_from_python_and_the_command_line(built, capsys):
    photos = sorted(built["db"].glob("*.jpg"))
    query, center = photos[0], built["positions"][photos[4].name]  # a London photo; a prior in Venice
    inside = {n for n, pos in built["positions"].items() if haversine_m(*center, *pos) <= 300}
    assert len(inside) == 3 and query.name not in inside
    with hafloc.Index.open(built["index"]) as index:
        res = index.locate(query, near=center, within=300)
        nowhere = index.locate(query, near=(0.0, 0.0), within=1000)
        with pytest.raises(HaflocError, match="go together"):
            index.locate(query, near=center)
    assert {m["image"] for m in res.matches} == inside  # the best look-alike, in London, is left out
    assert res.to_dict()["near"] == {"lat": center[0], "lon": center[1], "within_m": 300.0}
    assert nowhere.estimate is None and nowhere.unknown["reason"] == "no indexed photo within 1000 m of 0,0"
    near = f"{center[0]},{center[1]}"
    argv = ["locate", str(query), "--index", str(built["index"]), "--json", "--no-progress"]
    assert main([*argv, "--near", near, "--within", "300"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0] == res.to_dict()
    assert main([*argv, "--near", near]) == 2
    assert "--near LAT,LON and --within M go together" in capsys.readouterr().err

"""``hafloc locate --json`` and ``POST /locate`` give one document, checked against docs/locate.schema.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hafloc.cli import main
from hafloc.serve.app import MAX_CORRESPONDENCES, create_app, server_document
from test_cli_index import make_small_model, run_cli

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "locate.schema.json").read_text())
FAST = ("--backend", "torch", "--no-progress")


def check(doc: dict) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)


@pytest.fixture(scope="module")
def lund(shared_data, tmp_path_factory) -> dict:
    """8 Lund cathedral photos indexed with xfeat local features: answers carry inliers and correspondences."""
    root = tmp_path_factory.mktemp("schema")
    src = shared_data / "lund_gps" / "images"
    keep = {p.name for p in sorted(src.glob("*.jpg"))[:8]}
    photos = Path(shutil.copytree(src, root / "photos", ignore=lambda _d, names: [n for n in names if n not in keep]))
    model = make_small_model(sorted(photos.glob("*.jpg")), root / "small.model")
    local = ("--local", "xfeat", "--max-keypoints", "512", "--local-max-side", "480")
    argv = ("index", "build", photos, "--model", model, "--index", root / "index", *local, *FAST)
    assert main([str(a) for a in argv]) == 0
    return {"root": root, "photos": photos, "index": root / "index"}


@pytest.fixture(scope="module")
def client(lund):
    with TestClient(create_app(lund["index"], backend="torch")) as c:
        yield c


def test_cli_json_follows_the_schema(lund, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_text("not a photo")
    photo = sorted(lund["photos"].glob("*.jpg"))[2]
    code, out, err = run_cli(
        capsys, "locate", photo, tmp_path / "broken.jpg", "--index", lund["index"], "--json", *FAST
    )
    assert code == 0, err
    doc = json.loads(out)
    check(doc)
    assert [f["image"] for f in doc["failures"]] == [str(tmp_path / "broken.jpg")]
    assert doc["results"][0]["matches"][0]["root"] == str(lund["photos"].resolve())  # the CLI's own machine
    with pytest.raises(jsonschema.ValidationError):  # the check has teeth: a stray key is refused
        check({**doc, "root": "/"})


def test_server_answers_the_cli_document_without_paths_or_overlays(lund, client, capsys):
    photo = sorted(lund["photos"].glob("*.jpg"))[2]
    r = client.post("/locate", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    doc = r.json()
    check(doc)
    assert doc["index"] == "index" and doc["failures"] == [] and len(doc["results"]) == 1
    res = doc["results"][0]
    assert "attention" not in res and all("root" not in m for m in res["matches"])
    assert str(lund["root"]) not in r.text and str(Path(lund["root"]).resolve()) not in r.text
    assert len(r.content) < 50_000, len(r.content)
    best = res["matches"][0]
    assert best["image"] == photo.name and best["inliers"] > 0
    corr = best["correspondences"]  # documented in the schema, checked above
    assert len(corr["query"]) == len(corr["db"]) == min(best["inliers"], MAX_CORRESPONDENCES)
    # the same document as the CLI's for the same photo: same keys, same matches in the same order
    code, out, _ = run_cli(capsys, "locate", photo, "--index", lund["index"], "--json", *FAST)
    cli = json.loads(out)["results"][0]
    assert set(cli) == set(res) and [m["image"] for m in cli["matches"]] == [m["image"] for m in res["matches"]]
    assert cli["estimate"] == pytest.approx(res["estimate"], abs=1e-4)


def test_attention_overlays_only_on_request(lund, client):
    photo = sorted(lund["photos"].glob("*.jpg"))[0]
    r = client.post("/locate?attention=1", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    check(r.json())
    att = r.json()["results"][0]["attention"]
    assert set(att) == {"low", "mid", "high"} and all(
        a["overlay"].startswith("data:image/png;base64,") for a in att.values()
    )


def test_head_health_answers_200(client):
    r = client.head("/health")
    assert r.status_code == 200 and r.content == b""
    assert client.get("/health").json()["status"] == "ok"


def test_correspondences_are_thinned_evenly():
    pairs = [[float(i), float(i)] for i in range(1000)]
    result = {
        "image": "q.jpg",
        "estimate": None,
        "calibrated": False,
        "matches": [
            {
                "image": "a.jpg",
                "root": "/srv/photos",
                "id": 1,
                "lat": None,
                "lon": None,
                "similarity": 0.9,
                "distance_m": None,
                "inliers": 1000,
                "correspondences": {"query": pairs, "db": pairs, "query_size": [640, 480], "db_size": [640, 480]},
            }
        ],
    }
    doc = server_document("idx", result)
    check(doc)
    corr = doc["results"][0]["matches"][0]["correspondences"]
    assert (
        len(corr["query"]) == MAX_CORRESPONDENCES
        and corr["query"][0] == [0.0, 0.0]
        and corr["db"][-1] == [999.0, 999.0]
    )
    assert "root" not in doc["results"][0]["matches"][0]

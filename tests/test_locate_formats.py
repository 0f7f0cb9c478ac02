"""``hafloc locate --format json|csv|geojson|kml|table --output FILE`` on real photos with a small real model."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hafloc.cli import main
from hafloc.index.export_formats import render, summary_row
from test_cli_index import N_DB, N_POSITIONED, make_photo_db, make_small_model, run_cli

REPO = Path(__file__).resolve().parents[1]
FAST = ("--backend", "torch", "--no-progress")
KML_NS = {"k": "http://www.opengis.net/kml/2.2"}


@pytest.fixture(scope="module")
def work(tmp_path_factory, shared_data) -> dict:
    root = tmp_path_factory.mktemp("locate_formats")
    data = make_photo_db(shared_data / "landmarks_mini" / "images", root)
    data["model"] = make_small_model(sorted(data["db"].glob("*.jpg")), root / "small.model")
    data["index"] = root / "index"
    assert (
        main(
            [
                "index",
                "build",
                str(data["db"]),
                "--model",
                str(data["model"]),
                "--index",
                str(data["index"]),
                "--positions",
                str(data["csv"]),
                *FAST,
            ]
        )
        == 0
    )
    # queries: every database photo (with --top-k 1 the unpositioned ones match only themselves: no
    # estimate), one under a name that needs CSV quoting, and one file that is not a photo
    q = root / "queries"
    q.mkdir()
    for n in data["names"]:
        shutil.copy(data["db"] / n, q / n)
    data["odd_name"] = 'odd, "quoted" name.jpg'
    shutil.copy(data["db"] / sorted(data["positions"])[0], q / data["odd_name"])
    (q / "broken.jpg").write_text("not a photo")
    data["queries"] = q
    return data


def _locate(work, capsys, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "locate", work["queries"], "--index", work["index"], "--top-k", "1", *extra, *FAST)


@pytest.fixture(scope="module")
def doc(work) -> dict:
    """The JSON document of the query folder (the reference the other formats are checked against)."""
    out = work["queries"].parent / "ref.json"
    assert (
        main(
            [
                "locate",
                str(work["queries"]),
                "--index",
                str(work["index"]),
                "--top-k",
                "1",
                "--format",
                "json",
                "--output",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    return json.loads(out.read_text())


def _expected_position(work, image: str) -> tuple[float, float] | None:
    name = Path(image).name
    if name == work["odd_name"]:
        name = sorted(work["positions"])[0]
    return work["positions"].get(name)


def test_json_alias_and_output_file_agree_with_stdout(work, doc, capsys):
    code, out_alias, _ = _locate(work, capsys, "--json")
    assert code == 0
    code, out_fmt, _ = _locate(work, capsys, "--format", "json")
    assert code == 0 and json.loads(out_alias) == json.loads(out_fmt) == doc
    assert len(doc["results"]) == N_DB + 1 and [Path(f["image"]).name for f in doc["failures"]] == ["broken.jpg"]
    assert sum(r["estimate"] is None for r in doc["results"]) == N_DB - N_POSITIONED


def test_geojson_is_a_valid_feature_collection(work, doc, capsys):
    code, out, err = _locate(work, capsys, "--format", "geojson")
    assert code == 0, err

    def no_nan(tok):  # RFC 7946 is JSON: NaN / Infinity are not allowed
        raise AssertionError(f"non-finite number {tok} in GeoJSON")

    gj = json.loads(out, parse_constant=no_nan)
    assert gj["type"] == "FeatureCollection" and isinstance(gj["features"], list)
    assert len(gj["features"]) == len(doc["results"]) == N_DB + 1
    assert [Path(f["image"]).name for f in gj["failures"]] == ["broken.jpg"]
    n_null = 0
    for feat, res in zip(gj["features"], doc["results"]):
        assert feat["type"] == "Feature" and set(feat) == {"type", "geometry", "properties"}
        props = feat["properties"]
        assert props["image"] == res["image"]
        expected = _expected_position(work, res["image"])
        if expected is None:  # an unpositioned photo: listed with null geometry and the reason
            n_null += 1
            assert feat["geometry"] is None and props["lat"] is None and props["confidence"] == 0.0
            assert props["unknown_reason"] == "no match has a position" and props["estimate"] is None
        else:
            geom = feat["geometry"]
            assert geom["type"] == "Point" and len(geom["coordinates"]) == 2
            lon, lat = geom["coordinates"]  # [lon, lat], never [lat, lon]
            assert math.isclose(lat, expected[0], abs_tol=1e-5) and math.isclose(lon, expected[1], abs_tol=1e-5)
            assert -180 <= lon <= 180 and -90 <= lat <= 90
            assert props["confidence"] == res["estimate"]["confidence"] and props["radius_m"] == 25.0
        top = res["matches"][0]
        assert props["top_image"] == top["image"] and props["top_similarity"] == top["similarity"]
        assert props["top_match"] == top
    assert n_null == N_DB - N_POSITIONED


def test_kml_has_one_placemark_per_photo(work, doc, capsys):
    code, out, err = _locate(work, capsys, "--format", "kml")
    assert code == 0, err
    root = ET.fromstring(out.encode("utf-8"))
    assert root.tag == "{http://www.opengis.net/kml/2.2}kml"
    marks = root.findall(".//k:Placemark", KML_NS)
    assert len(marks) == len(doc["results"])
    for pm, res in zip(marks, doc["results"]):
        assert pm.findtext("k:name", namespaces=KML_NS) == res["image"]
        desc = pm.findtext("k:description", namespaces=KML_NS)
        assert f"best match {res['matches'][0]['image']}" in desc
        data = {d.get("name"): d.findtext("k:value", namespaces=KML_NS) for d in pm.findall(".//k:Data", KML_NS)}
        coords = pm.findtext(".//k:Point/k:coordinates", namespaces=KML_NS)
        if res["estimate"] is None:  # listed, but never drawn at 0, 0
            assert coords is None and desc.startswith("no estimate: no match has a position")
        else:
            lon, lat, _ = (float(v) for v in coords.split(","))
            assert (lat, lon) == (res["estimate"]["lat"], res["estimate"]["lon"])
            assert float(data["confidence"]) == res["estimate"]["confidence"]
    assert "broken.jpg" in root.findtext("k:Document/k:description", namespaces=KML_NS)


def test_csv_round_trips(work, doc, capsys):
    code, out, err = _locate(work, capsys, "--format", "csv")
    assert code == 0, err
    assert out.startswith("image,lat,lon,confidence,") and "\r\n" in out
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    located, failed = rows[:-1], rows[-1]
    assert len(located) == len(doc["results"])
    for row, res in zip(located, doc["results"]):
        assert row["image"] == res["image"] and row["error"] == ""
        est, top = res["estimate"], res["matches"][0]
        if est is None:
            assert row["lat"] == row["lon"] == "" and row["confidence"] == "0.0"
        else:
            assert (float(row["lat"]), float(row["lon"]), float(row["confidence"])) == (
                est["lat"],
                est["lon"],
                est["confidence"],
            )
        assert row["top_image"] == top["image"] and float(row["top_similarity"]) == top["similarity"]
    assert any(Path(r["image"]).name == work["odd_name"] for r in located)  # comma and quotes survived
    assert Path(failed["image"]).name == "broken.jpg" and "not an image" in failed["error"] and failed["lat"] == ""


def test_fields_added_by_later_stages_pass_through(doc):
    """Keys other stages add (a calibration flag, a verified estimate, an "unknown" answer) reach CSV and GeoJSON."""
    extended = json.loads(json.dumps(doc))
    for res in extended["results"]:
        res["calibrated"] = True
        if res["estimate"] is not None:
            res["estimate"]["verified"] = True
        else:
            res["unknown"] = {"reason": "confidence below 0.5", "confidence": 0.1}
    rows = list(csv.DictReader(io.StringIO(render(extended, "csv"), newline="")))
    assert {"calibrated", "estimate_verified"} <= set(rows[0])
    unknown = [r for r, res in zip(rows, extended["results"]) if res["estimate"] is None]
    assert unknown and all(r["unknown_reason"] == "confidence below 0.5" and r["confidence"] == "0.1" for r in unknown)
    gj = json.loads(render(extended, "geojson"))
    assert all(f["properties"]["calibrated"] is True for f in gj["features"])
    assert summary_row(extended["results"][0])["calibrated"] is True


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


def test_output_is_all_or_nothing(work, tmp_path, capsys):
    target = tmp_path / "out.geojson"
    target.write_text("old result\n")
    # nothing locatable: exit 2 (bad input), the old file is kept as it was
    code, _, err = run_cli(
        capsys,
        "locate",
        work["queries"] / "broken.jpg",
        "--index",
        work["index"],
        "--format",
        "geojson",
        "--output",
        target,
        *FAST,
    )
    assert code == 2 and "not written" in err and target.read_text() == "old result\n"
    # a folder as the output: one line naming it, nothing created
    code, _, err = _locate(work, capsys, "--format", "csv", "--output", str(tmp_path))
    assert (
        code == 2
        and err.strip().splitlines()[-1] == f"hafloc: error: {tmp_path}: is a folder; --output needs a file name"
    )
    # the write itself fails half-way (file size limit): the old file stays whole, no partial file is left
    script = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); from hafloc.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "locate",
            str(work["queries"]),
            "--index",
            str(work["index"]),
            "--top-k",
            "10",
            "--format",
            "geojson",
            "--output",
            str(target),
            *FAST,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hafloc: error: {target}: cannot write") and "Traceback" not in proc.stderr
    assert target.read_text() == "old result\n" and _leftovers(tmp_path) == []
    # and a normal run replaces it whole
    code, _, err = _locate(work, capsys, "--format", "geojson", "--output", str(target))
    assert code == 0 and f"to {target}" in err
    assert len(json.loads(target.read_text())["features"]) == N_DB + 1 and _leftovers(tmp_path) == []


def test_table_is_the_default(work, capsys):
    code, out, _ = _locate(work, capsys)
    assert code == 0
    blocks = [b for b in out.strip().split("\n\n") if b]
    assert len(blocks) == N_DB + 1
    assert sum("no estimate (no match has a position)" in b for b in blocks) == N_DB - N_POSITIONED


def test_output_writes_through_fifo_symlink_and_device(work, doc, tmp_path, capsys):
    """``--output`` to a FIFO, a symlink or /dev/null writes through it and never replaces it."""
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    code, _, err = _locate(work, capsys, "--json", "--output", fifo)
    reader.join(timeout=30)
    assert code == 0, err
    assert json.loads(got[0]) == doc and stat.S_ISFIFO(os.lstat(fifo).st_mode)

    target = tmp_path / "runs" / "today.json"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    code, _, err = _locate(work, capsys, "--json", "--output", link)
    assert code == 0, err
    assert link.is_symlink() and json.loads(target.read_text()) == doc

    code, _, err = _locate(work, capsys, "--json", "--output", "/dev/null")
    assert code == 0, err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_help_and_table_name_the_distance_for_what_it_is(work, doc, capsys):
    """--help: --top-k feeds the estimate; the table's distance column says it is from the estimate."""
    from hafloc.cli import build_parser
    from hafloc.datasets.geo import haversine_m

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["locate"]
    top_k = next(a for a in sub._actions if a.dest == "top_k")
    assert "estimate is made from" in top_k.help and "calibrat" in top_k.help
    assert "'from est.'" in sub.description and "not from the photo" in sub.description
    code, out, _ = _locate(work, capsys)
    header = next(line for line in out.splitlines() if "similarity" in line)
    assert "from est." in header and "distance" not in header
    res = next(r for r in doc["results"] if r["estimate"] and r["matches"][0]["lat"] is not None)
    m, est = res["matches"][0], res["estimate"]
    assert m["distance_m"] == pytest.approx(haversine_m(est["lat"], est["lon"], m["lat"], m["lon"]), abs=0.01)

"""Calibrated confidence: leave-one-out labels, the fitted calibrator, locate/serve 'unknown' answers.

The index holds real outdoor photos: Lund cathedral (EXIF GPS) and GardensPoint / SFU Mountain
frames (a distinct position per published place). Unrelated photos: uniform noise, flat grey and
indoor ie_tower frames.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hafloc.cli import main
from hafloc.datasets.geo import haversine_m
from hafloc.index.calibrate import (
    CALIBRATION_FILE,
    FEATURES,
    INLIER_FEATURE,
    Calibrator,
    calibrate_index,
    leave_one_out,
    load_calibrator,
)
from hafloc.index.calibration_model import expected_calibration_error
from hafloc.index.rerank import shipped_rule
from hafloc.index.store import Extracted, IndexStore
from test_cli_index import make_small_model, run_cli

FAST = ("--backend", "torch", "--no-progress")
GP_LAT, GP_LON = -27.4772, 153.0283  # QUT Gardens Point, Brisbane


@pytest.fixture(scope="module")
def outdoor(tmp_path_factory, shared_data) -> dict:
    root = tmp_path_factory.mktemp("calib")
    db = root / "db"
    for p in sorted((shared_data / "lund_gps" / "images").glob("*.jpg")):
        (db / "lund").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, db / "lund" / p.name)
    rows = ["image,lat,lon"]
    gp = shared_data / "gardenspoint_mini"
    for sub in ("vprtutorial_first10", "nicktrinh_triplets"):
        for p in sorted((gp / sub).rglob("*.jpg")):
            rel = p.relative_to(gp)
            (db / "gp" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, db / "gp" / rel)
            # labels as places: place i of a set 150 m north of place i-1
            place = int(p.stem) if sub.startswith("vpr") else 20 + int(rel.parts[1][1:])
            rows.append(f"gp/{rel.as_posix()},{GP_LAT + 0.00135 * place},{GP_LON}")
    (root / "positions.csv").write_text("\n".join(rows) + "\n")
    photos = sorted(db.rglob("*.jpg"))
    model = make_small_model(photos[::12], root / "small.model")
    unrelated = root / "unrelated"
    unrelated.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(unrelated / "noise.png")
    Image.new("RGB", (400, 300), (128, 128, 128)).save(unrelated / "grey.png")
    indoor = sorted((shared_data / "ie_tower_floors").rglob("*.jpg"))[::400][:5]
    for p in indoor:
        shutil.copy(p, unrelated / p.name)
    index = root / "index"
    build = ["index", "build", db, "--model", model, "--index", index, "--positions", root / "positions.csv", *FAST]
    code = main([str(a) for a in build])
    assert code == 0
    return {
        "root": root,
        "db": db,
        "model": model,
        "index": index,
        "unrelated": unrelated,
        "photos": photos,
        "n": len(photos),
    }


def test_build_calibrates_and_the_file_is_json_that_survives_reopen(outdoor):
    path = outdoor["index"] / CALIBRATION_FILE
    doc = json.loads(path.read_text())  # JSON, not pickle
    for key in (
        "features_version",
        "agree_m",
        "exclude_m",
        "n_samples",
        "positives_rate",
        "ece_heldout",
        "created_at",
        "method",
        "model_fingerprint",
    ):
        assert key in doc
    assert doc["n_samples"] == outdoor["n"] and doc["agree_m"] == 25.0 and doc["exclude_m"] == 5.0
    assert 0.0 < doc["positives_rate"] < 1.0 and 0.0 <= doc["ece_heldout"] <= 1.0
    assert len(doc["heldout"]["p"]) == len(doc["heldout"]["y"]) == doc["n_samples"]
    with IndexStore.open(outdoor["index"]) as store:
        cal = load_calibrator(store)
        assert cal is not None
        again = Calibrator.from_json(cal.to_json())
        from hafloc.index.build import probe_descriptors

        # same data, same seed, the same unrelated probes: the same fit
        fresh = calibrate_index(store, progress=False, write=False, probes=probe_descriptors(store))
    rng = np.random.default_rng(1)
    for _ in range(20):
        f = {
            "best_similarity": rng.uniform(0.3, 1),
            "margin": rng.uniform(0, 0.3),
            "agreement": rng.uniform(0, 1),
            "log_agreeing": np.log1p(rng.integers(1, 10)),
        }
        p = cal.probability(f)
        assert 0.0 <= p <= 1.0
        assert again.probability(f) == pytest.approx(p, abs=1e-12)
        assert fresh.probability(f) == pytest.approx(p, abs=1e-9)


def test_probability_never_falls_with_more_similarity_margin_or_agreement(outdoor):
    with IndexStore.open(outdoor["index"]) as store:
        cal = load_calibrator(store)
    grid = np.linspace(0.0, 1.0, 101)
    for base in (
        {"best_similarity": 0.6, "margin": 0.02, "agreement": 0.3, "log_agreeing": np.log(2)},
        {"best_similarity": 0.8, "margin": 0.10, "agreement": 0.9, "log_agreeing": np.log(5)},
    ):
        for name, values in (
            ("best_similarity", grid),
            ("margin", grid * 0.5),
            ("agreement", grid),
            ("log_agreeing", np.log1p(np.arange(1, 11))),
        ):
            ps = [cal.probability({**base, name: float(v)}) for v in values]
            assert all(0.0 <= p <= 1.0 for p in ps)
            assert np.all(np.diff(ps) >= -1e-12), name
        # and it does rise over the range of similarities: it is not a constant
        assert cal.probability({**base, "best_similarity": 1.0}) > cal.probability({**base, "best_similarity": 0.3})


def test_unrelated_photos_get_low_calibrated_confidence(outdoor, capsys):
    code, out, err = run_cli(capsys, "locate", outdoor["unrelated"], "--index", outdoor["index"], "--json", *FAST)
    assert code == 0, err
    results = json.loads(out)["results"]
    assert len(results) == 7
    for res in results:
        assert res["calibrated"] is True and res["radius_m"] == 25.0
        assert res["estimate"]["confidence"] <= 0.2, (res["image"], res["estimate"])
    # while the database's own photos (found exactly, with their neighbours) come out confident
    lund = sorted((outdoor["db"] / "lund").glob("*.jpg"))[:5]
    code, out, _ = run_cli(capsys, "locate", *lund, "--index", outdoor["index"], "--json", *FAST)
    confs = [r["estimate"]["confidence"] for r in json.loads(out)["results"]]
    assert max(confs) > 0.5


def test_min_confidence_answers_unknown_with_a_reason(outdoor, capsys):
    noise = outdoor["unrelated"] / "noise.png"
    code, out, _ = run_cli(
        capsys, "locate", noise, "--index", outdoor["index"], "--min-confidence", "0.5", "--json", *FAST
    )
    res = json.loads(out)["results"][0]
    assert code == 0 and res["estimate"] is None
    assert "below the minimum 0.5" in res["unknown"]["reason"] and 0.0 <= res["unknown"]["confidence"] <= 0.2
    assert res["matches"]  # the matches are still shown
    code, out, _ = run_cli(capsys, "locate", noise, "--index", outdoor["index"], "--min-confidence", "0.5", *FAST)
    assert f"{noise}: unknown (confidence " in out
    code, out, _ = run_cli(
        capsys, "locate", noise, "--index", outdoor["index"], "--min-confidence", "0", "--json", *FAST
    )
    assert json.loads(out)["results"][0]["estimate"] is not None
    code, _, err = run_cli(capsys, "locate", noise, "--index", outdoor["index"], "--min-confidence", "1.5", *FAST)
    assert code != 0 and "--min-confidence must lie in [0, 1]" in err


def test_uncalibrated_fallback_also_looks_at_similarity(outdoor, tmp_path, capsys):
    index = tmp_path / "index"
    shutil.copytree(outdoor["index"], index)
    (index / CALIBRATION_FILE).unlink()
    code, out, err = run_cli(
        capsys,
        "locate",
        outdoor["unrelated"] / "noise.png",
        outdoor["unrelated"] / "grey.png",
        "--index",
        index,
        "--json",
        *FAST,
    )
    assert code == 0, err
    for res in json.loads(out)["results"]:
        assert res["calibrated"] is False and res["estimate"]["confidence"] <= 0.25
    # another radius than the calibration's: said, and the confidence falls back
    code, out, err = run_cli(
        capsys,
        "locate",
        outdoor["unrelated"] / "noise.png",
        "--index",
        outdoor["index"],
        "--agree-m",
        "50",
        "--json",
        *FAST,
    )
    assert json.loads(out)["results"][0]["calibrated"] is False and "calibrated for 25 m, not 50 m" in err


def test_calibrate_command_info_and_report(outdoor, tmp_path, capsys):
    index = tmp_path / "index"
    shutil.copytree(outdoor["index"], index)
    code, out, _ = run_cli(
        capsys, "index", "calibrate", "--index", index, "--exclude-m", "0", "--json", "--no-progress"
    )
    doc = json.loads(out)["calibration"]
    assert code == 0 and doc["exclude_m"] == 0.0 and doc["n_samples"] == outdoor["n"] and "heldout" not in doc
    code, out, _ = run_cli(capsys, "index", "info", index, "--json", "--report", tmp_path / "report")
    info = json.loads(out)
    assert info["calibration"]["usable"] is True and info["calibration"]["exclude_m"] == 0.0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "reliability.png" in page and "coverage.png" in page and "ECE" in page
    for png in ("reliability.png", "coverage.png"):
        with Image.open(tmp_path / "report" / png) as im:
            assert im.size[0] > 200
    code, out, _ = run_cli(capsys, "index", "info", index)
    assert "calibrated within 25 m on" in out
    code, _, err = run_cli(capsys, "index", "calibrate", "--index", index, "--agree-m", "-1")
    assert code != 0 and "--agree-m must be positive" in err


def test_server_passes_calibration_and_unknown_through(outdoor):
    from fastapi.testclient import TestClient

    from hafloc.index.locator import LocatorConfig
    from hafloc.serve.app import create_app

    app = create_app(
        outdoor["index"], backend="torch", locator_config=LocatorConfig(backend="torch", min_confidence=0.5)
    )
    with TestClient(app) as client:
        health = client.get("/health").json()
        assert health["calibrated"] is True and health["radius_m"] == 25.0
        data = (outdoor["unrelated"] / "grey.png").read_bytes()
        res = client.post("/locate", files={"file": ("grey.png", data, "image/png")}).json()["results"][0]
        assert res["estimate"] is None and res["calibrated"] is True and "below the minimum" in res["unknown"]["reason"]


# -- leave-one-out on a constructed index ----------------------------------------------------------

M_PER_DEG = 111_195.0


def _constructed(tmp_path: Path) -> IndexStore:
    """A (query) photo with a near-duplicate 3 m away, a weaker true match 20 m away and a look-alike 1 km away.

    Descriptors: A = e0; B (3 m) ~ A (0.99); D (1 km) 0.9; C (20 m) 0.8. Filler images far away are
    dissimilar to everything.
    """
    dim = 16
    rng = np.random.default_rng(0)

    def unit(v):
        return (v / np.linalg.norm(v)).astype(np.float32)

    e = np.eye(dim, dtype=np.float32)
    a = e[0]
    descs = {
        "a.jpg": a,
        "b.jpg": unit(0.99 * a + np.sqrt(1 - 0.99**2) * e[1]),
        "c.jpg": unit(0.8 * a + 0.6 * e[2]),
        "d.jpg": unit(0.9 * a + np.sqrt(1 - 0.81) * e[3]),
    }
    north = {"a.jpg": 0.0, "b.jpg": 3.0, "c.jpg": 20.0, "d.jpg": 1000.0}
    for i in range(6):
        descs[f"f{i}.jpg"] = unit(rng.standard_normal(dim) * 0.1 + e[4 + i])
        north[f"f{i}.jpg"] = 5000.0 + 1000 * i
    root = tmp_path / "photos"
    root.mkdir()
    for n in descs:
        Image.new("RGB", (8, 8)).save(root / n)
    positions = {n: (48.0 + d / M_PER_DEG, 11.0) for n, d in north.items()}
    store = IndexStore.create(tmp_path / "idx", "f" * 16, dim)

    def extract(paths, names):
        return Extracted(list(names), np.stack([descs[n] for n in names]))

    store.add(sorted(descs), root, extract, positions=positions, progress=False)
    return store


def test_leave_one_out_hides_the_image_and_its_neighbours(tmp_path):
    with _constructed(tmp_path) as store:
        ids, names, _ = store.descriptors()
        row_a = names.index("a.jpg")
        seen: dict[int, list[str]] = {}

        def rerank(row, matches):
            seen[row] = [m.image for m in matches]
            return matches

        for exclude, label, best, hidden in (
            (0.0, 1, 0.99, {"a.jpg"}),
            (5.0, 0, 0.9, {"a.jpg", "b.jpg"}),
            (25.0, 0, 0.9, {"a.jpg", "b.jpg", "c.jpg"}),
        ):
            s = leave_one_out(store, agree_m=25.0, exclude_m=exclude, k=3, progress=False, rerank=rerank)
            i = s.rows.index(row_a)
            assert s.labels[i] == label, exclude
            assert s.features[i]["best_similarity"] == pytest.approx(best, abs=1e-4)  # never itself (1.0)
            assert not hidden & set(seen[row_a]) and len(seen[row_a]) == 3
            # nobody is ever matched with itself
            assert all(names[r] not in seen[r] for r in seen)
        # without exclusion, B (3 m) answers for A; with 5 m, the 1 km look-alike D wins over C (20 m)
        s = leave_one_out(store, exclude_m=5.0, k=3, progress=False, rerank=rerank)
        assert seen[row_a][0] == "d.jpg" and "c.jpg" in seen[row_a]


def test_inliers_get_their_own_model_used_only_when_known(outdoor):
    """A re-ranker (issue 10's hook) that reports many inliers for right answers: the inliers model
    learns from it; queries without an inlier count keep the base model."""
    with IndexStore.open(outdoor["index"]) as store:
        rows = store.images()
        truth = {i: (r["lat"], r["lon"]) for i, r in enumerate(rows)}
        calls = []

        def rerank(row, matches):
            calls.append(row)
            lat, lon = truth[row]
            best = matches[0]
            right = best.positioned and haversine_m(lat, lon, best.lat, best.lon) <= 25.0
            matches[0].inliers = 80 if right else 3
            return matches

        cal = calibrate_index(store, rerank=rerank, progress=False, write=False)
        base = load_calibrator(store)
    assert len(calls) == outdoor["n"] and cal.meta["reranked"] is True
    assert cal.inliers is not None and INLIER_FEATURE in cal.inliers.features
    f = {"best_similarity": 0.7, "margin": 0.05, "agreement": 0.6, "log_agreeing": np.log(3)}
    assert cal.probability({**f, INLIER_FEATURE: np.log1p(80)}) > cal.probability({**f, INLIER_FEATURE: np.log1p(3)})
    assert cal.probability(f) == pytest.approx(base.probability(f), abs=1e-9)  # no count: the base model
    assert set(cal.base.features) <= set(FEATURES)


def test_ece_of_known_cases():
    y = np.array([1, 0] * 50)
    assert expected_calibration_error(np.full(100, 0.5), y) == pytest.approx(0.0)
    assert expected_calibration_error(np.full(100, 0.9), y) == pytest.approx(0.4)
    assert expected_calibration_error(y.astype(float), y) == pytest.approx(0.0)


@pytest.mark.browser
def test_browser_shows_confidence_in_words_and_the_unknown_case(outdoor, tmp_path):
    from test_serve import _browser, _serve

    open_page = _browser().open_page
    with _serve(outdoor["index"], "--min-confidence", "0.5") as url:
        with open_page(url + "/") as (page, console_errors, failed_requests):
            page.set_input_files("#file", str(outdoor["unrelated"] / "noise.png"))
            page.wait_for_selector("#result:not([hidden])")
            page.wait_for_function("document.querySelector('#confidence').textContent.length > 0")
            assert page.locator("#estimate").inner_text() == "unknown"
            assert page.locator("#confidence").inner_text().startswith("unknown: confidence 0.")
            assert "below the minimum 0.5" in page.locator("#confidence").inner_text()
            # a database photo itself: found exactly, among its neighbours -> likely
            lund = sorted((outdoor["db"] / "lund").glob("*.jpg"))[0]
            page.set_input_files("#file", str(lund))
            page.wait_for_function("document.querySelector('#estimate').textContent !== 'unknown'")
            text = page.locator("#confidence").inner_text()
            assert text.startswith(("likely within 25 m", "uncertain:")), text
        assert console_errors == [] and failed_requests == []


def test_default_exclusion_falls_back_to_zero_when_places_share_one_position(tmp_path):
    """Label-style ground truth: both photos of a place sit on one point, so hiding 5 m hides every
    right answer. The default (auto) then calibrates with 0 m and says so; an explicit 5 m refuses
    with a hint."""
    from hafloc.errors import HaflocError
    from hafloc.index.calibrate import summary_line

    dim, rng = 64, np.random.default_rng(0)
    descs, positions = {}, {}
    for j in range(30):
        b = rng.standard_normal(dim)
        partner = b + 0.3 * rng.standard_normal(dim) if j < 20 else rng.standard_normal(dim)  # 10 places: lost
        for name, v in ((f"p{j}a.jpg", b), (f"p{j}b.jpg", partner)):
            descs[name] = (v / np.linalg.norm(v)).astype(np.float32)
            positions[name] = (48.0 + j * 1000 / M_PER_DEG, 11.0)
    root = tmp_path / "photos"
    root.mkdir()
    for n in descs:
        Image.new("RGB", (8, 8)).save(root / n)
    with IndexStore.create(tmp_path / "idx", "e" * 16, dim) as store:
        store.add(
            sorted(descs),
            root,
            lambda paths, names: Extracted(list(names), np.stack([descs[n] for n in names])),
            positions=positions,
            progress=False,
        )
        # write=False: the fit itself (a perfect heuristic on these made-up vectors ties it, so it would not be kept)
        cal = calibrate_index(store, progress=False, write=False)
        assert cal.meta["exclude_m"] == 0.0 and cal.meta["exclude_auto"] is True
        assert cal.meta["positives_rate"] == pytest.approx(40 / 60, abs=0.05)
        assert "hiding 5 m left too few right answers" in summary_line(cal)
        with pytest.raises(HaflocError, match=r"0 right and 60 wrong.*--exclude-m 0"):
            calibrate_index(store, exclude_m=5.0, progress=False, write=False)


def test_index_with_local_features_fits_its_rerank_rule_and_calibrates_reranked(outdoor, tmp_path, capsys):
    index = tmp_path / "local_index"
    code, out, err = run_cli(
        capsys,
        "index",
        "build",
        outdoor["db"],
        "--model",
        outdoor["model"],
        "--index",
        index,
        "--positions",
        outdoor["root"] / "positions.csv",
        "--local",
        "xfeat",
        "--max-keypoints",
        "512",
        "--local-max-side",
        "480",
        *FAST,
    )
    assert code == 0, err
    info = json.loads((index / "index.json").read_text())
    rule, refit = info["rerank"], info["rerank"]["refit"]
    # a few dozen leave-one-out queries overfit a refit: the index keeps the shipped learned scorer
    assert rule["kind"] == "learned" and refit["refit"] is False and "200" in refit["reason"]
    assert refit["queries"] >= 20 and rule["fitted"] == shipped_rule().fitted
    doc = json.loads((index / CALIBRATION_FILE).read_text())
    assert doc["reranked"] is True and doc["inliers"] is not None  # the inliers model exists
    photo = outdoor["photos"][3]
    code, out, err = run_cli(
        capsys, "locate", photo, outdoor["unrelated"] / "noise.png", "--index", index, "--json", *FAST
    )
    assert code == 0, err
    res, noise = json.loads(out)["results"]
    assert res["calibrated"] is True and res["estimate"]["verified"] is True
    assert res["matches"][0]["image"].endswith(photo.name) and res["matches"][0]["inliers"] >= 100
    assert res["estimate"]["confidence"] > 0.5
    assert (noise["estimate"] or noise["unknown"])["confidence"] <= 0.2


# -- honest confidence on a small index: the 50-answer rule, the keep rule, unrelated frames ---------


@pytest.fixture(scope="module")
def lund_only(tmp_path_factory, shared_data) -> dict:
    """The 29 Lund photos (EXIF GPS, all within ~130 m) indexed with a small model; frames showing no place."""
    root = tmp_path_factory.mktemp("lund_only")
    photos = Path(shutil.copytree(shared_data / "lund_gps" / "images", root / "photos"))
    model = make_small_model(sorted(photos.glob("*.jpg")), root / "small.model")
    frames = root / "frames"
    frames.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(frames / "noise.png")
    Image.new("RGB", (400, 300), (128, 128, 128)).save(frames / "grey.png")
    Image.new("RGB", (400, 300), (0, 0, 0)).save(frames / "black.png")
    assert main([str(a) for a in ("index", "build", photos, "--model", model, "--index", root / "index", *FAST)]) == 0
    return {"root": root, "photos": photos, "index": root / "index", "frames": frames}


def _confidences(capsys, index: Path, *images: Path) -> dict[str, dict]:
    code, out, err = run_cli(capsys, "locate", *images, "--index", index, "--json", *FAST)
    assert code == 0, err
    return {Path(r["image"]).name: r for r in json.loads(out)["results"]}


def test_unrelated_frames_score_at_most_0_2_calibrated_or_not(lund_only, capsys):
    index, frames = lund_only["index"], sorted(lund_only["frames"].glob("*.png"))
    assert not (index / CALIBRATION_FILE).exists()  # 29 positioned photos: the build does not calibrate
    for name, res in _confidences(capsys, index, *frames).items():
        assert res["calibrated"] is False and res["estimate"]["confidence"] <= 0.2, (name, res["estimate"])
    # below 50 answers: refused, saying what the user gets instead; --force fits with a warning
    # 30 m: on these 29 answers the fit beats the uncalibrated confidence (ECE 0.13 vs 0.21); at 10-25 m
    # the gated fallback is as well calibrated as a 29-answer fit or better, and the keep rule rejects it
    code, _, err = run_cli(capsys, "index", "calibrate", "--index", index, "--agree-m", "30", "--no-progress")
    assert code == 2 and "only 29 positioned photos, 50 needed" in err and "uncalibrated confidence" in err
    assert not (index / CALIBRATION_FILE).exists()
    argv = ("index", "calibrate", "--index", index, "--agree-m", "30", "--force", "--no-progress", "--json")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "warning: calibrated on only 29 leave-one-out answers" in err, err
    meta = json.loads(out)["calibration"]
    assert meta["ece_heldout"] < meta["ece_heuristic"] and meta["unrelated_similarity"] > 0  # kept: it beats it
    for name, res in _confidences(capsys, index, *frames).items():
        assert res["calibrated"] is True and res["radius_m"] == 30.0
        assert res["estimate"]["confidence"] <= 0.2, (name, res["estimate"])
    own = _confidences(capsys, index, *sorted(lund_only["photos"].glob("*.jpg"))[:5])
    assert max(r["estimate"]["confidence"] for r in own.values()) > 0.5  # real answers are not gated away


def test_a_calibration_no_better_than_uncalibrated_is_not_kept(lund_only, tmp_path):
    from hafloc.index.calibrate import CalibrationNotKept

    index = tmp_path / "index"
    shutil.copytree(lund_only["index"], index)
    (index / CALIBRATION_FILE).write_text("{}")  # an earlier calibration: removed with the rejected fit
    with IndexStore.open(index) as store:
        _, _, desc = store.descriptors()
        # probes as similar as the photos themselves gate every answer to 0: worse than uncalibrated
        with pytest.raises(CalibrationNotKept, match=r"calibration not kept: its held-out ECE 0\.\d+ does not beat"):
            calibrate_index(store, agree_m=10, min_samples=0, probes=desc, progress=False)
    assert not (index / CALIBRATION_FILE).exists()


def test_shrunk_fit_follows_the_prior_with_few_answers_and_the_data_with_many():
    from hafloc.index.calibration_model import PRIOR_STRENGTH, _fit_shrunk, _Model

    names = ["a", "b"]
    truth, prior = np.array([2.0, 0.5, -1.0]), np.array([0.2, 1.5, 1.0])  # coefficients a, b, intercept
    prior_model = _Model(features=names, mean=[0.0, 0.0], scale=[1.0, 1.0], coef=list(prior[:2]), intercept=prior[2])
    rng = np.random.default_rng(0)

    def fitted(n: int) -> np.ndarray:
        x = rng.normal(size=(n, 2))
        y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(x @ truth[:2] + truth[2])))).astype(int)
        m = _fit_shrunk(x, y, names, prior_model, PRIOR_STRENGTH)
        return np.array([*m.coef, m.intercept])

    few, many = fitted(12), fitted(20_000)
    assert np.linalg.norm(few - prior) < np.linalg.norm(few - truth)
    assert np.abs(many - truth).max() < 0.1
    # a single class is no error with a prior: the fit stays a smooth logistic near the prior
    m = _fit_shrunk(rng.normal(size=(10, 2)), np.ones(10, int), names, prior_model, PRIOR_STRENGTH)
    assert all(c >= 0 for c in m.coef) and m.intercept > prior[2]


def test_default_model_indexes_calibrate_smoothly_towards_the_shipped_prior(outdoor, tmp_path):
    from hafloc.index.calibrate import FEATURES, PRIOR_FILE, index_uses_default_model, load_prior, prior_for
    from hafloc.index.calibration_model import PRIOR_STRENGTH, _fit_shrunk

    prior = load_prior()
    assert prior is not None, "the shipped prior is for another default model: rerun scripts/fit_calibration_prior.py"
    assert prior.meta["n_samples"] >= 500 and prior.meta["agree_m"] == 25.0 and prior.inliers is None
    reranked = load_prior(reranked=True)
    assert reranked is not None and reranked.inliers is not None and "log_inliers" in reranked.inliers.features
    doc = json.loads(PRIOR_FILE.read_text())
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({**doc, "model_sha256": "0" * 64}))
    assert load_prior(path=stale) is None  # a prior of another default model is never used
    with IndexStore.open(outdoor["index"]) as store:  # built with a model of its own: no prior
        assert not index_uses_default_model(store) and prior_for(store, 25.0, 10, False) is None
    index = tmp_path / "index"
    build = ["index", "build", outdoor["db"], "--index", index, "--positions", outdoor["root"] / "positions.csv", *FAST]
    assert main([str(a) for a in build]) == 0  # no --model: the default, adapted to these photos
    with IndexStore.open(index) as store:
        assert index_uses_default_model(store)
        assert prior_for(store, 10.0, 10, False) is None  # the prior's radius only
        assert prior_for(store, 25.0, 10, True).meta["pipeline"] == "reranked"  # xfeat: the default pipeline
        # a small calibration (30 answers): smooth, not a few isotonic steps, and pulled to the prior
        cal = calibrate_index(store, max_samples=30, min_samples=0, write=False, progress=False)
        samples = leave_one_out(store, 25.0, 5.0, 10, 30, 0, progress=False)
    assert cal.meta["prior"] is not None and cal.meta["method"] == "logistic"
    assert len(set(cal.meta["heldout"]["p"])) > 10
    names = list(FEATURES)
    x = np.array([[f[n] for n in names] for f in samples.features])
    own = _fit_shrunk(x, samples.labels, names, prior.base, 0.0)  # the same fit without the prior's weight
    shrunk = np.array([*cal.base.coef, cal.base.intercept])
    centre = np.array([*prior.base.coef, prior.base.intercept])
    assert np.linalg.norm(shrunk - centre) < np.linalg.norm(np.array([*own.coef, own.intercept]) - centre)
    assert cal.meta["prior"]["strength"] == PRIOR_STRENGTH


def test_build_again_on_a_calibrated_index_keeps_and_says_it(lund_only, shared_data, tmp_path, capsys):
    index, photos, model = tmp_path / "index", lund_only["photos"], lund_only["root"] / "small.model"
    shutil.copytree(lund_only["index"], index)
    argv = ("index", "calibrate", "--index", index, "--agree-m", "30", "--force", "--no-progress")
    assert run_cli(capsys, *argv)[0] == 0
    fitted = (index / CALIBRATION_FILE).read_text()
    # a rerun adding nothing: 29 positioned photos are too few for the automatic calibration
    code, out, err = run_cli(capsys, "index", "build", photos, "--model", model, "--index", index, *FAST)
    assert code == 0 and "added 0, already indexed 29" in out
    assert "not calibrated" not in out + err  # it said so, though locate used the calibration
    assert "calibrated on 29 leave-one-out answers" in out and "kept (no photo added since)" in out
    assert (index / CALIBRATION_FILE).read_text() == fitted  # the --agree-m 30 fit, not replaced
    # a photo added: the calibration is older than the index, and said to be
    more = tmp_path / "more"
    more.mkdir()
    shutil.copy(sorted((shared_data / "landmarks_mini" / "images").glob("*.jpg"))[0], more / "other.jpg")
    code, out, err = run_cli(capsys, "index", "build", more, "--model", model, "--index", index, *FAST)
    assert code == 0 and "added 1" in out and "not calibrated" not in out + err
    assert "kept, fitted when the index held 29 photos (29 positioned now, 50 needed to refit automatically" in out

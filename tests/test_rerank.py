"""Re-ranking by verified local matches, end to end on real photos: index build --local, locate
--rerank, the kill-and-rerun guarantee with local features, and the hloc export of features/matches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from hafloc.cli import main
from hafloc.datasets.geo import haversine_m
from hafloc.images.gps import read_gps
from hafloc.index.locator import Locator, LocatorConfig
from hafloc.index.store import Extracted, IndexStore
from hafloc.local import create_extractor
from test_cli_index import kill_midway, make_small_model, run_cli

REPO = Path(__file__).resolve().parents[1]
FAST = ("--backend", "torch", "--no-progress")
LOCAL = ("--local", "xfeat", "--max-keypoints", "512", "--local-max-side", "480")


@pytest.fixture(scope="module")
def lund(shared_data, tmp_path_factory) -> dict:
    """12 Lund cathedral photos (EXIF GPS only) indexed with xfeat local features."""
    root = tmp_path_factory.mktemp("lund")
    photos = root / "photos"
    photos.mkdir()
    for p in sorted((shared_data / "lund_gps" / "images").glob("*.jpg"))[:12]:
        shutil.copy(p, photos / p.name)
    model = make_small_model(sorted(photos.glob("*.jpg")), root / "small.model")
    index = root / "index"
    code = main(
        [
            "index",
            "build",
            str(photos),
            "--model",
            str(model),
            "--index",
            str(index),
            "--chunk-size",
            "5",
            *LOCAL,
            *FAST,
        ]
    )
    assert code == 0
    return {"root": root, "photos": photos, "model": model, "index": index}


@pytest.fixture(scope="module")
def xfeat():
    return create_extractor("xfeat", max_keypoints=512, max_side=480)


def test_index_stores_local_features_in_hloc_layout(lund, capsys):
    code, out, _ = run_cli(capsys, "index", "info", lund["index"], "--json")
    info = json.loads(out)
    assert info["local"]["extractor"] == "xfeat" and info["local"]["conf"]["max_keypoints"] == 512
    assert 0 < info["local"]["bytes_per_image"] <= 300 * 1024
    files = sorted((lund["index"] / "chunks").glob("local_*.h5"))
    assert len(files) == 3  # 12 images in chunks of 5
    # a finished build leaves nothing else behind (no temp or lock files of the chunk writes)
    assert not [p.name for p in (lund["index"] / "chunks").iterdir() if p.name.startswith(".")]
    names = []
    with h5py.File(files[0], "r") as f:
        for name, grp in f.items():
            names.append(name)
            kp, desc, scores = grp["keypoints"][()], grp["descriptors"][()], grp["scores"][()]
            assert kp.ndim == 2 and kp.shape[1] == 2 and desc.shape == (64, len(kp)) and scores.shape == (len(kp),)
            assert desc.dtype == np.float16 and 0 < len(kp) <= 512
            w, h = grp["image_size"][()]
            assert (w, h) == (1024, 768) and kp[:, 0].max() < w and kp[:, 1].max() < h
    assert len(names) == 5
    code, out, _ = run_cli(capsys, "index", "info", lund["index"])
    assert "local      xfeat" in out and "kB per image" in out


def test_locate_reranks_and_reports_inliers(lund, capsys):
    photos = sorted(lund["photos"].glob("*.jpg"))
    queries = [photos[3], photos[8]]
    code, out, err = run_cli(capsys, "locate", *queries, "--index", lund["index"], "--top-k", "4", "--json", *FAST)
    assert code == 0, err
    for res, q in zip(json.loads(out)["results"], queries):
        top = res["matches"][0]
        # the photo itself is in the index: the most similar match, and verified by a wealth of inliers
        assert top["image"] == q.name and top["inliers"] >= 100
        assert all(isinstance(m["inliers"], int) for m in res["matches"])
        assert res["estimate"]["verified"] is True
        lat, lon = read_gps(q)
        assert haversine_m(res["estimate"]["lat"], res["estimate"]["lon"], lat, lon) < 25
    code, out, _ = run_cli(capsys, "locate", queries[0], "--index", lund["index"], "--rerank", "0", "--json", *FAST)
    res = json.loads(out)["results"][0]
    assert code == 0 and all(m["inliers"] is None for m in res["matches"]) and res["estimate"]["verified"] is False


def test_rerank_lifts_the_true_match_from_rank_3_to_1(shared_data, lund, xfeat, tmp_path):
    """Global similarity ranks two photos of other cities above the right one; verification fixes it."""
    lund_photos = sorted((shared_data / "lund_gps" / "images").glob("*.jpg"))
    query, true = lund_photos[4], lund_photos[3]
    others = sorted((shared_data / "landmarks_mini" / "images").glob("*.jpg"))[:4]
    db = [others[0], others[1], true, others[2], others[3]]
    names = [p.name for p in db]
    sims = np.array([0.95, 0.94, 0.93, 0.6, 0.5])
    rng = np.random.default_rng(0)
    q = rng.standard_normal(16).astype(np.float32)
    q /= np.linalg.norm(q)
    desc = []
    for s in sims:  # unit vectors with exactly the wanted cosine to q
        r = rng.standard_normal(16)
        r -= (r @ q) * q
        r /= np.linalg.norm(r)
        desc.append(s * q + np.sqrt(1 - s * s) * r)
    positions = {names[i]: (48.0 + i, 2.0) for i in (0, 1, 3, 4)}
    positions[true.name] = read_gps(true)
    from hafloc.descriptors.modelfile import load_model

    fp = load_model(lund["model"]).fingerprint()
    local = {"extractor": "xfeat", "conf": dict(xfeat.conf)}
    index = tmp_path / "crafted"
    with IndexStore.create(index, fp, 16, model_path=lund["model"], local=local) as store:
        feats = {p.name: xfeat.extract_path(p) for p in db}
        store.add(
            [str(p) for p in db],
            "/",
            lambda paths, ns: Extracted(
                list(ns),
                np.stack([desc[names.index(Path(n).name)] for n in ns]).astype(np.float32),
                local={n: feats[Path(n).name] for n in ns},
            ),
            positions={str(p)[1:]: positions[p.name] for p in db},
            progress=False,
        )
    loc = Locator(index, lund["model"], LocatorConfig(backend="torch", rerank=5))
    try:
        qf = loc.reranker.features(loc.extractor.load(query))
        glob = Locator(index, lund["model"], LocatorConfig(backend="torch", rerank=0))
        try:
            before = glob.results(q[None], ["q"], k=5)[0]
        finally:
            glob.close()
        after = loc.results(q[None], ["q"], k=5, local=[qf], correspondences=True)[0]
    finally:
        loc.close()
    assert Path(before["matches"][2]["image"]).name == true.name
    assert Path(after["matches"][0]["image"]).name == true.name
    assert after["matches"][0]["inliers"] > max(m["inliers"] for m in after["matches"][1:])
    assert after["estimate"]["verified"] is True
    lat, lon = read_gps(query)
    assert haversine_m(after["estimate"]["lat"], after["estimate"]["lon"], lat, lon) < 25
    corr = after["matches"][0]["correspondences"]
    assert len(corr["query"]) == len(corr["db"]) == after["matches"][0]["inliers"]


def test_build_local_killed_midway_then_rerun_equals_uninterrupted(lund, shared_data, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((shared_data / "lund_gps" / "images").glob("*.jpg"))[:10]:
        shutil.copy(p, photos / p.name)
    total = 10
    cmd = lambda idx: [  # noqa: E731
        sys.executable,
        "-m",
        "hafloc",
        "index",
        "build",
        str(photos),
        "--model",
        str(lund["model"]),
        "--index",
        str(idx),
        "--chunk-size",
        "2",
        "--batch-size",
        "1",
        *LOCAL,
        *FAST,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    idx = tmp_path / "killed"
    assert 2 <= kill_midway(cmd(idx), idx, env) < total
    rerun = subprocess.run(cmd(idx), capture_output=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    ref = tmp_path / "reference"
    assert run_cli(capsys, *cmd(ref)[3:])[0] == 0
    with IndexStore.open(idx) as a, IndexStore.open(ref) as b:
        ids_a, names_a, desc_a = a.descriptors()
        ids_b, names_b, desc_b = b.descriptors()
        assert sorted(names_a) == sorted(names_b) and len(set(names_a)) == total
        fa = a.local_features(list(ids_a))
        fb = b.local_features(list(ids_b))
        by_b = dict(zip(names_b, ids_b))
        for i, n in zip(ids_a, names_a):
            np.testing.assert_allclose(fa[int(i)].keypoints, fb[int(by_b[n])].keypoints, atol=1e-3)
            np.testing.assert_allclose(fa[int(i)].descriptors, fb[int(by_b[n])].descriptors, atol=1e-2)
    # no local file without committed rows survives the rerun
    chunks = {int(p.stem.split("_")[1]) for p in (idx / "chunks").glob("chunk_*.npy")}
    assert {int(p.stem.split("_")[1]) for p in (idx / "chunks").glob("local_*.h5")} == chunks


def test_export_hloc_writes_features_and_matches(lund, tmp_path, capsys):
    queries = tmp_path / "queries"
    queries.mkdir()
    photos = sorted(lund["photos"].glob("*.jpg"))
    for p in (photos[2], photos[7]):
        shutil.copy(p, queries / f"q_{p.name}")
    out = tmp_path / "hloc"
    code, stdout, err = run_cli(
        capsys,
        "index",
        "export-hloc",
        "--index",
        lund["index"],
        "--queries",
        queries,
        "--output",
        out,
        "--top-k",
        "3",
        *FAST,
    )
    assert code == 0, err
    pairs = [line.split() for line in (out / "pairs-query-hafloc3.txt").read_text().splitlines()]
    with h5py.File(out / "features.h5", "r") as f, h5py.File(out / "matches.h5", "r") as m:
        for q, d in pairs:
            assert q in f and d in f
            n0 = len(f[q]["keypoints"])
            grp = m[q.replace("/", "-")][d.replace("/", "-")]
            m0, s0 = grp["matches0"][()], grp["matching_scores0"][()]
            assert m0.shape == (n0,) and s0.shape == (n0,)
            valid = m0 >= 0
            assert valid.any() and m0[valid].max() < len(f[d]["keypoints"])
        # the query that is a copy of database photo 2 matches it far better than any other pair
        same = [(q, d) for q, d in pairs if q == f"q_{photos[2].name}" and d == photos[2].name]
        assert same
        counts = {(q, d): int((m[q][d]["matches0"][()] >= 0).sum()) for q, d in pairs}
        assert counts[same[0]] == max(counts.values())
    # only the results are left in the folder: no temp or lock file
    assert sorted(p.name for p in out.iterdir()) == [
        "db.txt",
        "features.h5",
        "global-feats-hafloc.h5",
        "matches.h5",
        "pairs-query-hafloc3.txt",
        "queries.txt",
    ]


def _h5_pair_keys(path: Path) -> set[tuple[str, str]]:
    with h5py.File(path, "r") as m:
        return {(a, b) for a in m for b in m[a]}


def test_export_hloc_db_pairs_for_triangulation(lund, tmp_path, capsys):
    """--db-pairs: the database pairs hloc's pairs_from_retrieval would select, features of every
    database image and their matches; a later export without it leaves no stale pair behind."""
    queries = tmp_path / "queries"
    queries.mkdir()
    photos = sorted(lund["photos"].glob("*.jpg"))
    shutil.copy(photos[4], queries / "q.jpg")
    out = tmp_path / "hloc"
    argv = ("index", "export-hloc", "--index", lund["index"], "--queries", queries, "--output", out, *FAST)
    code, stdout, err = run_cli(capsys, *argv, "--top-k", "2", "--db-pairs", "3")
    assert code == 0, err
    db = (out / "db.txt").read_text().split()
    assert sorted(db) == sorted(p.name for p in photos)
    # the expected selection, from the exported descriptors: top 3 by cosine, no self, none below 0
    with h5py.File(out / "global-feats-hafloc.h5", "r") as g:
        desc = np.stack([g[n]["global_descriptor"][()] for n in db]).astype(np.float64)
    sims = desc @ desc.T
    np.fill_diagonal(sims, -np.inf)
    expected = [(db[i], db[j]) for i in range(len(db)) for j in np.argsort(-sims[i])[:3] if sims[i, j] >= 0]
    db_pairs = [tuple(line.split(" ")) for line in (out / "pairs-db-hafloc3.txt").read_text().split("\n")]
    assert db_pairs == expected and len(db_pairs) > len(db)
    q_pairs = [tuple(line.split(" ")) for line in (out / "pairs-query-hafloc2.txt").read_text().split("\n")]
    with h5py.File(out / "features.h5", "r") as f:
        assert sorted(f) == sorted([*db, "q.jpg"])  # every database image, paired or not, and the query
        for name in f:
            kp, d, sc, size = (f[name][k][()] for k in ("keypoints", "descriptors", "scores", "image_size"))
            assert kp.shape == (len(sc), 2) and d.shape == (64, len(sc)) and len(sc) > 0 and size.shape == (2,)
        n_kp = {name: len(f[name]["keypoints"]) for name in f}
    keys = _h5_pair_keys(out / "matches.h5")
    # the query pairs as written; each database pair once, in one of its orders (hloc reads either)
    assert set(q_pairs) <= keys
    unordered = {frozenset(p) for p in q_pairs + db_pairs}
    assert len(keys) == len(unordered) and {frozenset(k) for k in keys} == unordered
    with h5py.File(out / "matches.h5", "r") as m:
        matched = 0
        for a, b in keys:
            m0 = m[a][b]["matches0"][()]
            assert m0.shape == (n_kp[a],) and m0.max() < n_kp[b]
            matched += bool((m0 >= 0).any())
        assert matched > len(keys) / 2  # photos of one cathedral: most retrieved pairs share points
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]

    # the same folder again, without --db-pairs: matches.h5 and features.h5 are replaced, not added to
    code, _, err = run_cli(capsys, *argv, "--top-k", "2")
    assert code == 0, err
    assert _h5_pair_keys(out / "matches.h5") == set(q_pairs)
    with h5py.File(out / "features.h5", "r") as f:
        assert sorted(f) == sorted({n for p in q_pairs for n in p})


def test_export_hloc_refuses_a_folder_in_use(lund, tmp_path, capsys):
    """A second export into a folder another export is writing to stops at once with one line."""
    from hafloc.fileio import exclusive_folder

    out = tmp_path / "hloc"
    argv = ("index", "export-hloc", "--index", lund["index"], "--queries", lund["photos"], *FAST)
    with exclusive_folder(out, "busy"):  # as a running export holds it
        code, _, err = run_cli(capsys, *argv, "--output", out)
    assert code == 2
    assert (
        err.strip()
        == f"hafloc: error: {out}: another export is writing to this folder; wait for it or pick another --output"
    )
    assert list(out.iterdir()) == []
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "file")
    assert code == 2 and err.strip() == f"hafloc: error: {tmp_path / 'file'}: is not a folder"


@pytest.mark.browser
def test_browser_shows_the_verified_match_lines(lund, tmp_path):
    from test_serve import _browser, _offsite, _serve

    browser = _browser()
    photo = sorted(lund["photos"].glob("*.jpg"))[5]
    requests: list[str] = []
    with _serve(lund["index"]) as url, browser.open_page(url + "/", requests=requests) as (page, errors, failed):
        with page.expect_response("**/locate?attention=1") as resp:
            page.set_input_files("#file", str(photo))
        res = resp.value.json()["results"][0]
        best = res["matches"][0]
        assert best["image"] == photo.name and best["inliers"] > 0
        page.wait_for_selector("#verify-box", state="visible")
        # one SVG line per drawn inlier correspondence, between the photo and the best match side by side
        n_lines = page.locator("#verify line").count()
        assert n_lines == min(best["inliers"], 300) and n_lines > 0
        assert page.locator("#verify image").count() == 2
        page.wait_for_function("document.querySelectorAll('#verify image')[1].getAttribute('href')")
        # the database photo at the panel's size, as sharp as the photo beside it (not a 256 px thumbnail)
        href = page.locator("#verify image").nth(1).get_attribute("href")
        assert href == f"{url}/thumbnails/{best['id']}?size=large"
        natural = page.evaluate(
            "(u) => new Promise((ok) => { const i = new Image(); i.onload = () => ok([i.naturalWidth, "
            "i.naturalHeight]); i.src = u; })",
            href,
        )
        assert natural == best["correspondences"]["db_size"] and max(natural) > 256
        assert f"{best['inliers']} verified inlier matches" in page.locator("#verify-caption").inner_text()
        assert f"{best['inliers']} inliers" in page.locator("#matches li").first.inner_text()
        browser.screenshot(page, tmp_path / "verify.png")
        assert not errors and not _offsite(requests, url)


def test_add_to_a_local_index_stores_local_features_and_verifies(lund, shared_data, tmp_path, capsys):
    index = tmp_path / "index"
    shutil.copytree(lund["index"], index)
    more = tmp_path / "more"
    more.mkdir()
    for p in sorted((shared_data / "gardenspoint_mini" / "vprtutorial_first10" / "query").glob("*.jpg"))[:3]:
        shutil.copy(p, more / p.name)
    code, out, err = run_cli(capsys, "index", "add", more, "--index", index, "--model", lund["model"], *FAST)
    assert code == 0 and "added 3" in out, err
    with IndexStore.open(index) as store:
        ids = [r["id"] for r in store.images() if r["root"] == str(more.resolve())]
        feats = store.local_features(ids)
    assert len(feats) == 3 and all(len(f) > 0 and f.image_size == (960, 540) for f in feats.values())
    code, out, err = run_cli(capsys, "index", "verify", "--index", index, "--no-model")
    assert code == 0, out + err
    # a removed photo's local features go with its descriptor when the chunk is compacted
    assert run_cli(capsys, "index", "remove", "--index", index, more / "0.jpg")[0] == 0
    assert run_cli(capsys, "index", "compact", "--index", index)[0] == 0
    code, out, err = run_cli(capsys, "index", "verify", "--index", index, "--no-model")
    assert code == 0, out + err
    with IndexStore.open(index) as store:
        rows = {r["path"]: r["id"] for r in store.images() if r["root"] == str(more.resolve())}
        assert set(rows) == {"1.jpg", "2.jpg"}
        assert set(store.local_features(list(rows.values()))) == set(rows.values())

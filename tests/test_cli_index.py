"""``hafloc index build|add|info|export-hloc`` and ``hafloc locate`` on real photos with a small real model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hafloc.cli import main
from hafloc.datasets.geo import haversine_m
from hafloc.descriptors.fit import fit_clusters
from hafloc.descriptors.modelfile import load_model, save_model
from hafloc.descriptors.network import GeoLocNet, ModelConfig
from hafloc.index.hloc_export import list_h5_names, read_global_descriptors
from hafloc.index.store import IndexStore

REPO = Path(__file__).resolve().parents[1]
LANDMARKS = {
    "london_bridge": (51.5079, -0.0877),
    "piazza_san_marco": (45.4341, 12.3388),
    "sacre_coeur": (48.8867, 2.3431),
    "st_pauls_cathedral": (51.5138, -0.0984),
    "united_states_capitol": (38.8899, -77.0091),
}
N_DB, N_POSITIONED = 12, 10


def make_photo_db(src: Path, root: Path, n: int = N_DB, n_positioned: int = N_POSITIONED) -> dict:
    """Copy ``n`` real photos into ``root``/db and write a positions CSV for the first ``n_positioned``
    (each photo ~110 m from the previous one of its landmark, so every photo has its own place)."""
    photos = sorted(src.glob("*.jpg"))[:n]
    db = root / "db"
    db.mkdir(parents=True)
    rows, positions = ["image,lat,lon"], {}
    for i, p in enumerate(photos):
        shutil.copy(p, db / p.name)
        if i < n_positioned:
            lat, lon = next(v for k, v in LANDMARKS.items() if p.name.startswith(k))
            lat += 0.001 * i
            positions[p.name] = (lat, lon)
            rows.append(f"{p.name},{lat},{lon}")
    (root / "positions.csv").write_text("\n".join(rows) + "\n")
    return {"db": db, "csv": root / "positions.csv", "names": [p.name for p in photos], "positions": positions}


def make_small_model(photos: list[Path], path: Path) -> Path:
    torch.manual_seed(0)
    model = GeoLocNet(ModelConfig.for_method("haf", num_clusters=8, proj_dim=32))
    model.config.max_side = 128
    fit_clusters(model, photos[:6], samples_per_image=40, progress=False)
    return save_model(model, path)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


FAST = ("--backend", "torch", "--no-progress")


@pytest.fixture(scope="module")
def work(tmp_path_factory, shared_data) -> dict:
    root = tmp_path_factory.mktemp("cli_index")
    data = make_photo_db(shared_data / "landmarks_mini" / "images", root)
    data["model"] = make_small_model(sorted(data["db"].glob("*.jpg")), root / "small.model")
    # a different model: same architecture, one cluster centre moved -> another fingerprint
    other = load_model(data["model"])
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if "centroid" in n or "cluster" in n).add_(0.5)
    data["other_model"] = save_model(other, root / "other.model")
    data["index"] = root / "index"
    code = main(
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
            "--chunk-size",
            "5",
            *FAST,
        ]
    )
    assert code == 0
    data["root"] = root
    return data


def test_build_indexes_everything_and_reports_unpositioned(work, tmp_path, capsys):
    # rebuilding into a fresh folder shows the report (the fixture's output is not captured per test)
    code, out, err = run_cli(
        capsys,
        "index",
        "build",
        work["db"],
        "--model",
        work["model"],
        "--index",
        tmp_path / "idx",
        "--positions",
        work["csv"],
        *FAST,
    )
    assert code == 0
    assert f"added {N_DB}" in out
    unpositioned = [n for n in work["names"] if n not in work["positions"]]
    assert "2 image(s) indexed without a position" in err
    for n in unpositioned:
        assert n in err
    code, out, _ = run_cli(capsys, "index", "info", work["index"], "--json")
    info = json.loads(out)
    assert info["counts"] == {"images": N_DB, "positioned": N_POSITIONED, "unpositioned": N_DB - N_POSITIONED}
    assert info["position_sources"] == {"csv": N_POSITIONED, "none": N_DB - N_POSITIONED}
    assert info["model_fingerprint"] == load_model(work["model"]).fingerprint()
    assert info["roots"] == [str(work["db"].resolve())]
    code, out, _ = run_cli(capsys, "index", "info", work["index"])
    assert code == 0 and f"{N_DB} ({N_POSITIONED} with a position" in out


def test_locate_database_photos_finds_their_own_position(work, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a photo")
    names = [n for n in work["names"] if n in work["positions"]][:3]
    code, out, err = run_cli(
        capsys,
        "locate",
        *[work["db"] / n for n in names],
        bad,
        tmp_path / "missing.jpg",
        "--index",
        work["index"],
        "--top-k",
        "4",
        "--json",
        *FAST,
    )
    assert code == 0, err
    doc = json.loads(out)
    assert [Path(r["image"]).name for r in doc["results"]] == names
    for res in doc["results"]:
        lat, lon = work["positions"][Path(res["image"]).name]
        assert haversine_m(res["estimate"]["lat"], res["estimate"]["lon"], lat, lon) < 1.0
        assert 0.0 <= res["estimate"]["confidence"] <= 1.0
        assert len(res["matches"]) == 4
        top = res["matches"][0]
        assert top["image"] == Path(res["image"]).name and top["similarity"] > 0.999 and top["distance_m"] < 1.0
        sims = [m["similarity"] for m in res["matches"]]
        assert sims == sorted(sims, reverse=True)
    failed = {Path(f["image"]).name: f["error"] for f in doc["failures"]}
    assert set(failed) == {"broken.jpg", "missing.jpg"}
    assert "not an image" in failed["broken.jpg"]
    assert "broken.jpg" in err and "missing.jpg" in err


def test_locate_folder_batch_and_table(work, capsys):
    code, out, _ = run_cli(capsys, "locate", work["db"], "--index", work["index"], "--top-k", "3", *FAST)
    assert code == 0
    blocks = [b for b in out.strip().split("\n\n") if b]
    assert len(blocks) == N_DB
    first_name = sorted(work["names"])[0]
    lat, lon = work["positions"][first_name]
    assert f"{first_name}: {lat:.6f}, {lon:.6f}  (confidence" in out
    assert "no estimate" not in blocks[0]
    assert all("similarity" in b.splitlines()[1] for b in blocks)


def test_locate_nothing_readable_fails(work, tmp_path, capsys):
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    code, _, err = run_cli(capsys, "locate", bad, "--index", work["index"], *FAST)
    assert code == 2  # all input bad
    assert "empty.jpg: empty file" in err


def test_mismatched_model_is_refused_with_one_line(work, capsys):
    for argv in (
        ["index", "add", work["db"], "--index", work["index"], "--model", work["other_model"]],
        ["locate", work["db"] / work["names"][0], "--index", work["index"], "--model", work["other_model"]],
    ):
        code, out, err = run_cli(capsys, *argv, *FAST)
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hafloc: error: ")
        assert "index was built with model" in lines[0] and "other.model" in lines[0]
    with IndexStore.open(work["index"]) as store:
        assert len(store) == N_DB  # nothing added by the refused model


def test_add_appends_without_duplicates(work, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for n in work["names"][:7]:
        shutil.copy(work["db"] / n, folder / n)
    idx = tmp_path / "idx"
    assert (
        run_cli(
            capsys,
            "index",
            "build",
            folder,
            "--model",
            work["model"],
            "--index",
            idx,
            "--positions",
            work["csv"],
            *FAST,
        )[0]
        == 0
    )
    for n in work["names"][7:]:
        shutil.copy(work["db"] / n, folder / n)
    code, out, _ = run_cli(capsys, "index", "add", folder, "--index", idx, "--positions", work["csv"], *FAST)
    assert code == 0 and f"added {N_DB - 7}, already indexed 7" in out
    code, out, _ = run_cli(capsys, "index", "add", folder, "--index", idx, *FAST)
    assert code == 0 and f"added 0, already indexed {N_DB}" in out
    with IndexStore.open(idx) as store, IndexStore.open(work["index"]) as ref:
        ids, names, desc = store.descriptors()
        assert sorted(names) == sorted(work["names"]) and len(set(names)) == len(names) == len(ids)
        _, ref_names, ref_desc = ref.descriptors()
        order = [ref_names.index(n) for n in names]
        np.testing.assert_allclose(desc, ref_desc[order], atol=1e-5)


def test_export_hloc_layout(work, tmp_path, capsys):
    queries = tmp_path / "queries"
    queries.mkdir()
    picked = [n for n in work["names"]][:3]
    for i, n in enumerate(picked):
        shutil.copy(work["db"] / n, queries / f"query_{i}.jpg")
    out_dir = tmp_path / "hloc"
    code, out, err = run_cli(
        capsys,
        "index",
        "export-hloc",
        "--index",
        work["index"],
        "--queries",
        queries,
        "--output",
        out_dir,
        "--top-k",
        "5",
        *FAST,
    )
    assert code == 0, err
    feats = out_dir / "global-feats-hafloc.h5"
    q_names = [f"query_{i}.jpg" for i in range(3)]
    assert sorted(list_h5_names(feats)) == sorted(work["names"] + q_names)
    with IndexStore.open(work["index"]) as store:
        _, db_names, db_desc = store.descriptors()
    _, got = read_global_descriptors(feats, db_names)
    np.testing.assert_allclose(got, db_desc, atol=1e-6)
    lines = (out_dir / "pairs-query-hafloc5.txt").read_text().split("\n")
    pairs = [tuple(line.split(" ")) for line in lines]
    assert len(pairs) == 3 * 5 and all(len(p) == 2 for p in pairs)
    for i, n in enumerate(picked):
        mine = [d for q, d in pairs if q == f"query_{i}.jpg"]
        assert len(mine) == 5 and mine[0] == n and set(mine) <= set(work["names"])
    assert (out_dir / "db.txt").read_text().split() == db_names
    assert (out_dir / "queries.txt").read_text().split() == q_names


def _committed(index: Path) -> int:
    try:
        with sqlite3.connect(index / "meta.sqlite", timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
    except sqlite3.Error:
        return 0


def kill_midway(cmd: list[str], idx: Path, env: dict, commits: int = 2, timeout: float = 120) -> int:
    """Run ``cmd`` (an index build into ``idx``), SIGKILL it once ``commits`` images are committed;
    returns how many are committed then."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout
    while _committed(idx) < commits and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"build ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return _committed(idx)


def test_cli_build_killed_midway_then_rerun_equals_uninterrupted(work, shared_data, tmp_path, capsys):
    # more and bigger images than the fixture, so the build lasts long enough to be killed inside it
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((shared_data / "landmarks_mini" / "images").glob("*.jpg")):
        shutil.copy(p, photos / p.name)
    total = len(list(photos.glob("*.jpg")))
    cmd = lambda idx: [  # noqa: E731
        sys.executable,
        "-m",
        "hafloc",
        "index",
        "build",
        str(photos),
        "--model",
        str(work["model"]),
        "--index",
        str(idx),
        "--positions",
        str(work["csv"]),
        "--chunk-size",
        "2",
        "--batch-size",
        "1",
        "--max-side",
        "384",
        *FAST,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    idx = tmp_path / "killed"
    partial = kill_midway(cmd(idx), idx, env)
    assert 2 <= partial < total, partial
    rerun = subprocess.run(cmd(idx), capture_output=True, timeout=120, env=env)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    ref_idx = tmp_path / "reference"  # uninterrupted, in-process (same code path, no interpreter start)
    assert run_cli(capsys, *cmd(ref_idx)[3:])[0] == 0
    with IndexStore.open(idx) as a, IndexStore.open(ref_idx) as b:
        _, names_a, desc_a = a.descriptors()
        _, names_b, desc_b = b.descriptors()
        assert len(names_a) == len(set(names_a)) == total
        assert sorted(names_a) == sorted(names_b)
        order = [names_b.index(n) for n in names_a]
        np.testing.assert_allclose(desc_a, desc_b[order], atol=1e-5)
        meta_a = {r["path"]: (r["lat"], r["lon"], r["position_source"]) for r in a.images()}
        meta_b = {r["path"]: (r["lat"], r["lon"], r["position_source"]) for r in b.images()}
        assert meta_a == meta_b
        # the search structure covers every image after the rerun
        assert a.search(desc_a[0], k=total)[0].image == names_a[0]
        assert len(a.search(desc_a[0], k=total)) == total


def test_build_compact_dim_dtype_then_locate_and_info(work, tmp_path, capsys):
    idx = tmp_path / "compact"
    code, out, err = run_cli(
        capsys,
        "index",
        "build",
        work["db"],
        "--model",
        work["model"],
        "--index",
        idx,
        "--positions",
        work["csv"],
        "--dim",
        "8",
        "--dtype",
        "float16",
        "--no-calibrate",
        *FAST,
    )
    assert code == 0, err
    info = json.loads((idx / "index.json").read_text())
    model_dim = load_model(work["model"]).out_dim
    assert (info["dim"], info["dtype"], info["projection"]) == (
        8,
        "float16",
        {"input_dim": model_dim, "dim": 8, "fitted_on": N_DB},
    )
    # a database photo as a query is projected like the database: it finds itself
    name = next(n for n in work["names"] if n in work["positions"])
    code, out, err = run_cli(capsys, "locate", work["db"] / name, "--index", idx, "--top-k", "2", "--json", *FAST)
    assert code == 0, err
    top = json.loads(out)["results"][0]["matches"][0]
    assert top["image"] == name and top["similarity"] > 0.999
    code, out, _ = run_cli(capsys, "index", "info", idx, "--json")
    fp = json.loads(out)["footprint"]
    assert fp["search"] == "flat" and fp["actual"]["descriptor_bytes"] > 0
    assert fp["estimated"]["disk_bytes"] == N_DB * 8 * 2  # 8-D float16 per image
    code, out, _ = run_cli(capsys, "index", "info", idx)
    assert "8-D float16 (the model's" in out and "footprint  search RAM" in out
    # the same index asked for another representation: one clear line
    code, out, err = run_cli(
        capsys, "index", "build", work["db"], "--model", work["model"], "--index", idx, "--dim", "4", *FAST
    )
    assert code != 0 and "index stores 8-D float16 descriptors, you asked for 4-D float16" in err
    assert len(err.strip().splitlines()) == 1


def test_compact_default_above_the_threshold_says_so(capsys):
    from hafloc.cli.index import compact_choice
    from hafloc.index.compact import COMPACT_THRESHOLD

    assert compact_choice(None, None, 1000, 24576, new=True) is None  # small: as the model gives it
    assert compact_choice(None, None, COMPACT_THRESHOLD + 1, 24576, new=False) is None  # existing: as it is
    assert compact_choice(None, None, COMPACT_THRESHOLD + 1, 24576, new=True) == {"dim": 256, "dtype": "float16"}
    assert "storing 256-D PCA-whitened float16 descriptors" in capsys.readouterr().err
    assert compact_choice(None, None, 90_000, 24576, new=True)  # 8.8 GB of float32: over the budget too
    assert compact_choice(None, None, COMPACT_THRESHOLD + 1, 128, new=True) == {"dim": None, "dtype": "float16"}
    assert compact_choice("full", "float32", 10**7, 24576, new=True) == {"dim": None, "dtype": "float32"}

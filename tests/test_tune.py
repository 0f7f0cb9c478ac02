"""Fusion-weight tuning: the grid's scores equal re-extracted fused descriptors, the pick is the
grid's best, and the weights land in the model file and the Table-2 files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from hafloc.datasets.detect import load_dataset
from hafloc.descriptors.extract import Extractor
from hafloc.descriptors.modelfile import load_model, save_model
from hafloc.errors import HaflocError
from hafloc.metrics.protocols import score
from hafloc.train.config import TrainConfig
from hafloc.train.loop import build_model
from hafloc.train.tune import pick_best, simplex_grid, tune_fusion_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_label_subset  # noqa: E402

SIZE = (64, 96)


@pytest.fixture(scope="module")
def floors12(shared_data, tmp_path_factory) -> Path:
    # 12 floors: enough places that recall@5 is not 100 % by chance
    return make_label_subset(shared_data, tmp_path_factory.mktemp("floors12"), labels=12, per_label=5, queries=3)


@pytest.fixture(scope="module")
def model_file(floors12, tmp_path_factory) -> Path:
    cfg = TrainConfig(method="haf", dataset=str(floors12), output="unused", image_size="64x96", clusters=8, proj_dim=32)
    torch.manual_seed(0)
    paths = sorted((floors12 / "images").rglob("*.jpg"))[::3]
    model, _ = build_model(cfg, paths, progress=False)
    path = tmp_path_factory.mktemp("tune") / "haf.model"
    save_model(model.eval(), path, meta={"trained": {"image_size": list(SIZE)}})
    return path


def test_simplex_grid():
    g = simplex_grid(3, 0.1)
    assert len(g) == 66 and all(abs(sum(w) - 1) < 1e-9 and min(w) >= 0 for w in g)
    assert len(set(g)) == 66 and (0.1, 0.4, 0.5) in g
    assert len(simplex_grid(3, 0.05)) == 231
    with pytest.raises(HaflocError):
        simplex_grid(3, 0.3)


def test_pick_best_tie_rules():
    grid = [(1.0, 0.0, 0.0), (0.3, 0.3, 0.4), (0.4, 0.3, 0.3), (0.0, 0.5, 0.5)]
    res = [
        {"recall@5": 90, "recall@1": 80},
        {"recall@5": 90, "recall@1": 60},
        {"recall@5": 90, "recall@1": 70},
        {"recall@5": 85, "recall@1": 85},
    ]
    assert pick_best(grid, res) == 2  # equal R@5 and equal distance to uniform -> higher R@1


def test_tuned_weights_are_the_grid_maximum_checked_by_reextraction(model_file, floors12):
    model = load_model(model_file)
    ds = load_dataset(floors12, split="test")
    res = tune_fusion_weights(model, ds, step=0.1, image_size=SIZE, progress=False)
    grid = {tuple(g["w"]): g for g in res["grid"]}
    assert len(grid) == 66
    best5 = max(g["recall@5"] for g in grid.values())
    assert res["recall@5"] == best5 and tuple(res["weights"]) in grid
    assert [round(float(w), 4) for w in model.head.fusion_weights().detach()] == [round(w, 4) for w in res["weights"]]
    # the grid is not flat (otherwise picking its maximum would prove nothing)
    assert min(g["recall@1"] for g in grid.values()) < max(g["recall@1"] for g in grid.values())
    # brute force: set the weights in a fresh model, re-extract fused descriptors, score
    worst = min(grid, key=lambda w: grid[w]["recall@5"])
    for w in {tuple(res["weights"]), worst, (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.1, 0.4, 0.5)}:
        m = load_model(model_file)
        m.head.set_fusion_weights(list(w))
        ex = Extractor(m, batch_size=8, image_size=SIZE)
        db = ex.extract_paths(ds.db_paths(), progress=False).descriptors
        q = ex.extract_paths(ds.q_paths(), progress=False).descriptors
        r = score(ds, db, q)
        assert r["recall@5"] == pytest.approx(grid[w]["recall@5"], abs=1e-6), w
        assert r["recall@1"] == pytest.approx(grid[w]["recall@1"], abs=1e-6), w
        assert r["recall@5"] <= res["recall@5"] + 1e-9


def test_cli_stores_weights_and_writes_table(model_file, floors12, tmp_path):
    from hafloc.cli import main

    model = tmp_path / "m.model"
    model.write_bytes(model_file.read_bytes())
    table = tmp_path / "table"
    assert (
        main(
            [
                "tune-weights",
                "--model",
                str(model),
                "--dataset",
                str(floors12),
                "--output",
                str(table),
                "--split",
                "test",
            ]
        )
        == 0
    )
    rows = json.loads((table / "weights.json").read_text())["rows"]
    assert len(rows) == 1 and {"dataset", "w1", "w2", "w3", "recall@1", "recall@5"} <= set(rows[0])
    tuned = load_model(model)
    w = [round(float(x), 4) for x in tuned.head.fusion_weights()]
    assert w == [rows[0]["w1"], rows[0]["w2"], rows[0]["w3"]]
    assert tuned.meta["fusion_tuning"]["weights"] == pytest.approx(w, abs=1e-4)
    assert "| dataset |" in (table / "weights.md").read_text()
    assert (table / "weights.png").stat().st_size > 1000
    # a second benchmark adds a row, the first one stays
    assert (
        main(
            [
                "tune-weights",
                "--model",
                str(model),
                "--dataset",
                str(floors12),
                "--output",
                str(table),
                "--split",
                "val",
                "--no-save",
            ]
        )
        == 0
    )
    names = [r["dataset"] for r in json.loads((table / "weights.json").read_text())["rows"]]
    assert sorted(names) == sorted({names[0], names[1]}) and len(names) == 2


def test_whitened_model_is_refitted(model_file, floors12, tmp_path):
    from hafloc.cli import main
    from hafloc.descriptors.fit import fit_whitening

    m = load_model(model_file)
    paths = sorted((floors12 / "images").rglob("*.jpg"))[:40]
    fit_whitening(m, paths, 16, progress=False)
    before = m.whitening.proj.clone()
    path = tmp_path / "w.model"
    save_model(m, path)
    assert (
        main(
            [
                "tune-weights",
                "--model",
                str(path),
                "--dataset",
                str(floors12),
                "--split",
                "test",
                "--image-size",
                "64x96",
            ]
        )
        == 0
    )
    tuned = load_model(path)
    assert tuned.meta["fusion_tuning"]["whitening"] == "refitted"
    assert tuned.whitening.dim == 16 and not torch.allclose(before, tuned.whitening.proj)


def test_single_level_method_is_refused(floors12):
    cfg = TrainConfig(method="netvlad", dataset=str(floors12), output="unused", image_size="64x96", clusters=8)
    model, _ = build_model(cfg, None, progress=False)
    with pytest.raises(HaflocError, match="single level"):
        tune_fusion_weights(model, load_dataset(floors12, split="test"), image_size=SIZE, progress=False)

"""``hafloc eval --rerank K`` on real photos in published layouts: re-ranking by verified local
matches never scores below global retrieval, at any K, on every benchmark set we can build here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hafloc.cli import main
from hafloc.datasets.detect import load_dataset
from hafloc.descriptors.modelfile import load_model
from hafloc.index.rerank import Reranker
from hafloc.metrics.evaluate import ExtractionSettings, extract_dataset, headline, image_key, score_descriptors
from hafloc.metrics.verified import RankReranker, RerankSettings
from layouts import even, gardens_at, landmarks_oxford, tower_subset

KS = (50, 5, 10, 20)  # 50 first: the smaller K reuse its verified pairs
LOCAL_CONF = {"max_keypoints": 512, "max_side": 480}


@pytest.fixture(scope="module")
def sets(shared_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rerank_sets")
    return {
        "gardens": gardens_at(shared_data, root / "gardens"),
        "landmarks": landmarks_oxford(shared_data, root / "landmarks"),
        "tower": tower_subset(shared_data, root / "tower", floors=6, gallery_per_floor=12, queries_per_floor=4),
    }


def _model(ds, out: Path) -> Path:
    imgs = [str(p) for p in even(ds.db_paths(), 16)]
    assert (
        main(
            [
                "model",
                "init",
                "--method",
                "haf",
                "--images",
                *imgs,
                "--output",
                str(out),
                "--clusters",
                "16",
                "--max-side",
                "256",
                "--fit-images",
                "16",
            ]
        )
        == 0
    )
    return out


# ie_tower: verified inliers carry no signal there (ROC AUC 0.53, benchmarks/verification.py): floors
# share repeated structure. The learned scorer (never fitted on it) loses 0.4 mAP at K = 50
# (25.3 vs 25.7) and 1 of 24 top-1 answers in benchmarks/fit_scorer.py: a known open problem
# (issue 20), kept visible here instead of clamping the rule.
TOWER_OPEN = pytest.mark.xfail(reason="issue 20: re-ranking below global on ie_tower (no verification signal)")


@pytest.mark.parametrize("name", ["gardens", "landmarks", pytest.param("tower", marks=TOWER_OPEN)])
def test_rerank_never_scores_below_global_at_any_k(sets, name, tmp_path):
    ds = load_dataset(sets[name], split="test")
    model = load_model(_model(ds, tmp_path / "haf.model"))
    settings = ExtractionSettings(backend="torch")
    d = extract_dataset(model, ds, settings, cache_dir=False, progress=False)
    ex = settings.extractor_for(model, ds)
    rr_settings = RerankSettings(k=KS[0], extractor="xfeat", conf=LOCAL_CONF)
    reranker = Reranker("xfeat", LOCAL_CONF)
    shared: dict[str, RankReranker] = {}

    def factory(ds_ok, db, q):
        if "rr" not in shared:
            shared["rr"] = RankReranker(
                rr_settings,
                reranker,
                ds_ok.db_paths(),
                ds_ok.q_paths(),
                db,
                q,
                load=ex.load,
                key=image_key,
                progress=False,
            )
        return shared["rr"]

    seen = {}
    for k in KS:
        if "rr" in shared:
            shared["rr"].k = k
        res = score_descriptors(ds, d, rerank=factory)
        glob = {key: res[f"global_{key}"] for key in headline(res)}
        reranked = headline(res)
        assert reranked.keys() == glob.keys() and reranked
        for key in reranked:
            assert reranked[key] >= glob[key] - 1e-9, (name, k, key, reranked[key], glob[key])
        seen[k] = (glob, reranked)
    print(f"\n{name}: " + "; ".join(f"K={k} {g} -> {r}" for k, (g, r) in sorted(seen.items())))


def test_eval_cli_reports_global_and_reranked_side_by_side(sets, tmp_path, capsys):
    ds = load_dataset(sets["gardens"], split="test")
    model = _model(ds, tmp_path / "haf.model")
    out = tmp_path / "r.json"
    rc = main(
        [
            "eval",
            "--model",
            str(model),
            "--dataset",
            str(sets["gardens"]),
            "--rerank",
            "5",
            "--max-keypoints",
            "512",
            "--cache",
            str(tmp_path / "cache"),
            "--backend",
            "torch",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out.read_text())
    for n in (1, 5, 10):
        assert f"recall@{n}" in doc and f"global_recall@{n}" in doc
    assert doc["rerank"]["k"] == 5 and doc["rerank"]["extractor"] == "xfeat" and doc["rerank"]["queries"] == 10
    assert doc["recall@1"] >= doc["global_recall@1"]
    assert "haf +rerank 5" in text and "re-ranking (xfeat, top 5)" in text
    # local features of the queries and candidates were cached for the next run
    assert any((tmp_path / "cache" / "local").rglob("*.npz"))

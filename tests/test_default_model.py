"""The shipped default model: trunk-less model files, the sha256 check, the model card, and
`index build` / `locate` with no --model at all."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from hafloc.cli import main as cli
from hafloc.descriptors import modelfile
from hafloc.descriptors.extract import Extractor
from hafloc.descriptors.modelfile import DEFAULT_FILE, DEFAULT_SHA256, load_model, read_model_file, save_model
from hafloc.descriptors.network import GeoLocNet, ModelConfig
from hafloc.errors import InputError


@pytest.fixture(scope="module")
def lund(shared_data):
    files = sorted((shared_data / "lund_gps" / "images").glob("*.jpg"))
    assert len(files) >= 8
    return files


def test_shipped_file_is_small_checked_and_carries_a_card():
    assert DEFAULT_FILE.is_file(), "the default model must ship inside the package"
    assert DEFAULT_FILE.stat().st_size <= 15 * 2**20
    assert hashlib.sha256(DEFAULT_FILE.read_bytes()).hexdigest() == DEFAULT_SHA256
    payload = read_model_file(None)
    assert payload["trunk"]["source"] == "pretrained"
    assert not any(k.startswith("backbone.") for k in payload["state_dict"])  # only what differs from ImageNet
    card = payload["meta"]["card"]
    for key in ("data", "split", "command", "seed", "iterations", "metrics"):
        assert key in card, key
    assert card["metrics"], "the card reports the metrics on every set"
    model = load_model(None)
    assert model.config.method == "haf" and model.meta["trained"]["dataset"]
    assert load_model("default").fingerprint() == model.fingerprint()


def test_model_info_prints_the_card(capsys):
    assert cli(["model", "info"]) == 0
    out = capsys.readouterr().out
    assert "model card" in out and "untrained" in out and "as built" in out
    card = read_model_file(None)["meta"]["card"]
    first_set = next(iter(card["metrics"]))
    assert first_set in out
    assert cli(["model", "info", "default", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["default"] is True and info["stored"]["trunk"].startswith("pretrained")


def test_trunk_less_file_round_trips_and_refuses_another_trunk(tmp_path, lund):
    torch.manual_seed(0)
    model = GeoLocNet(ModelConfig.for_method("gem"), pretrained=True).eval()
    save_model(model, tmp_path / "slim.model", trunk="pretrained")
    save_model(model, tmp_path / "full.model")
    assert (tmp_path / "slim.model").stat().st_size < (tmp_path / "full.model").stat().st_size / 5
    back = load_model(tmp_path / "slim.model")
    assert back.fingerprint() == model.fingerprint()
    d0 = Extractor(model).extract_paths(lund[:2], progress=False).descriptors
    d1 = Extractor(back).extract_paths(lund[:2], progress=False).descriptors
    np.testing.assert_allclose(d0, d1, atol=1e-6)
    # a file saved over other trunk weights cannot be completed from the package: refused, one line
    with torch.no_grad():
        next(model.backbone.parameters()).add_(0.01)
    save_model(model, tmp_path / "other.model", trunk="pretrained")
    with pytest.raises(InputError, match="other efficientnet-lite0 weights"):
        load_model(tmp_path / "other.model")


def test_damaged_default_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "haf-streets.model"
    data = bytearray(DEFAULT_FILE.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(modelfile, "DEFAULT_FILE", bad)
    with pytest.raises(InputError, match="damaged"):
        load_model(None)
    assert cli(["model", "info"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged" in err[0] and "sha256" in err[0]


def test_index_and_locate_with_no_model_at_all(tmp_path, lund, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in lund[:6]:  # fewer than ADAPT_MIN_IMAGES: the default model as shipped
        shutil.copy(f, photos / f.name)
    idx = tmp_path / "idx"
    assert cli(["index", "build", str(photos), "--index", str(idx), "--no-progress"]) == 0
    assert not (idx / "adapted.model").exists()
    info = json.loads((idx / "index.json").read_text())
    assert info["model_path"] == "default"
    assert info["local"]["extractor"] == "xfeat"  # the default pipeline verifies with xfeat (--local auto)
    assert info["model_fingerprint"] == load_model(None).fingerprint()
    capsys.readouterr()
    assert cli(["locate", str(photos / lund[2].name), "--index", str(idx), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    best = doc["results"][0]["matches"][0]
    assert best["image"].endswith(lund[2].name) and best["similarity"] > 0.99  # it finds itself first


def test_an_uncalibrated_default_index_gives_right_answers_confidence_and_blank_frames_none(tmp_path, lund, capsys):
    """Below 50 photos an index is not calibrated; its confidence is the heuristic gated by how similar
    blank and noise frames get on the index. The fixed ramp it replaced (0 at cosine 0.5) gave the
    default model's right answers ~0: its right matches score 0.3-0.5."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    query = next(f for f in lund if f.name == "05.jpg")
    for f in [f for f in lund if f != query][:20]:  # enough to adapt the clusters, as users' indexes are
        shutil.copy(f, photos / f.name)
    frames = [tmp_path / "grey.png", tmp_path / "noise.png"]
    Image.new("RGB", (400, 300), (128, 128, 128)).save(frames[0])
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(frames[1])
    idx = tmp_path / "idx"
    assert cli(["index", "build", str(photos), "--index", str(idx), "--local", "none", "--no-progress"]) == 0
    capsys.readouterr()
    assert cli(["locate", str(query), *map(str, frames), "--index", str(idx), "--json", "--no-progress"]) == 0
    right, *blank = json.loads(capsys.readouterr().out)["results"]
    assert (idx / "adapted.model").exists() and right["calibrated"] is False
    assert right["matches"][0]["similarity"] < 0.6  # where the old ramp gave at most 0.25 x the heuristic
    assert right["matches"][0]["image"] == "04.jpg" and right["estimate"]["confidence"] > 0.5  # 3 m away
    for res in blank:
        assert (res["estimate"] or res["unknown"])["confidence"] <= 0.2, res


def test_the_default_adapts_from_as_few_photos_as_give_k_means_its_features(tmp_path, lund):
    """From ``ADAPT_MIN_IMAGES`` photos (4:3, as phones take them) every level's k-means gets its 39
    features per cluster, by sampling more per photo; one photo fewer keeps the model as shipped."""
    from hafloc.index.adapt import ADAPT_FEATURES_PER_CLUSTER, ADAPT_MIN_IMAGES, ADAPTED_NAME, adapt_model

    shipped = load_model(None)
    assert adapt_model(shipped, lund[: ADAPT_MIN_IMAGES - 1], tmp_path / "few") is shipped
    assert not (tmp_path / "few" / ADAPTED_NAME).exists()
    adapted = adapt_model(shipped, lund[:ADAPT_MIN_IMAGES], tmp_path / "enough")
    fit = adapted.meta["adapted"]["fit"]
    assert adapted.meta["adapted"]["images"] == ADAPT_MIN_IMAGES
    for lv, info in fit["levels"].items():
        assert info["features"] >= ADAPT_FEATURES_PER_CLUSTER * info["clusters"], (lv, info)
    assert adapted.fingerprint() != shipped.fingerprint()  # the clusters moved
    assert read_model_file(tmp_path / "enough" / ADAPTED_NAME).get("trunk")  # only what differs from the trunk


def test_card_and_benchmarks_tell_the_same_numbers():
    """The model card's scores are the ones BENCHMARKS.md shows (both from benchmarks/real_training.py)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "BENCHMARKS.md").read_text()
    m = re.search(
        r"<!-- benchmark:real-training-test:begin -->(.*?)<!-- benchmark:real-training-test:end -->", text, re.S
    )
    assert m, "BENCHMARKS.md has no real-training-test section"
    first_table = "\n".join(m.group(1).split("\n\n")[1:2])  # prose, the models' table, then the versus tables
    lines = [line for line in first_table.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in lines[1:]}
    col = {name: header.index(name) for name in ("untrained", "default", "default, as built")}
    card = read_model_file(None)["meta"]["card"]
    for name, metric in card["metrics"].items():
        assert name in rows, name
        cells = rows[name]
        assert cells[col["untrained"]].startswith(f"{metric['untrained']:.1f}"), (name, cells)
        assert cells[col["default"]].startswith(f"{metric['model']:.1f}"), (name, cells)  # as shipped
        assert cells[col["default, as built"]].startswith(f"{metric['as_built']:.1f}"), (name, cells)


def test_local_auto_means_xfeat_only_for_a_new_index_of_the_default_model(tmp_path, lund):
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in lund[:3]:
        shutil.copy(f, photos / f.name)
    plain = tmp_path / "plain"
    assert cli(["index", "build", str(photos), "--index", str(plain), "--local", "none", "--no-progress"]) == 0
    assert json.loads((plain / "index.json").read_text()).get("local") is None
    shutil.copy(lund[3], photos / lund[3].name)  # a rerun without --local resumes it as it was built
    assert cli(["index", "build", str(photos), "--index", str(plain), "--no-progress"]) == 0
    info = json.loads((plain / "index.json").read_text())
    assert info.get("local") is None and info["counts"]["images"] == 4
    own = tmp_path / "own.model"
    assert (
        cli(["model", "init", "--images", str(photos), "--output", str(own), "--clusters", "4", "--max-side", "160"])
        == 0
    )
    theirs = tmp_path / "theirs"
    assert cli(["index", "build", str(photos), "--model", str(own), "--index", str(theirs), "--no-progress"]) == 0
    assert json.loads((theirs / "index.json").read_text()).get("local") is None  # a model of one's own: none


def test_repackaging_re_keys_the_calibration_prior_only_for_the_same_weights(tmp_path, monkeypatch):
    """scripts/package_default_model.py: a new card on the same weights keeps the prior (re-keyed
    to the new file's sha256); new weights leave it keyed to the old file, so it is ignored."""
    import importlib.util
    from pathlib import Path

    from hafloc.index import calibrate

    script = Path(__file__).resolve().parents[1] / "scripts" / "package_default_model.py"
    spec = importlib.util.spec_from_file_location("package_default_model", script)
    assert spec is not None and spec.loader is not None
    pkg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pkg)
    prior = tmp_path / "calibration-prior.json"
    prior.write_text(json.dumps({"format": "hafloc-calibration-prior", "model_sha256": "old"}))
    monkeypatch.setattr(calibrate, "PRIOR_FILE", prior)
    pkg.carry_prior("fp-a", "fp-b", "new")  # other weights: untouched
    assert json.loads(prior.read_text())["model_sha256"] == "old"
    pkg.carry_prior("fp-a", "fp-a", "new")
    assert json.loads(prior.read_text()) == {"format": "hafloc-calibration-prior", "model_sha256": "new"}

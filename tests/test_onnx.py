"""ONNX export and the ONNX Runtime backend (issue 7): parity with eager torch on real photos,
dynamic shapes, the CLI, the export cache and the fallback to torch."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
import torch

from hafloc.cli import main
from hafloc.descriptors.extract import Extractor
from hafloc.descriptors.fit import fit_clusters
from hafloc.descriptors.modelfile import load_model, save_model
from hafloc.descriptors.network import GeoLocNet, ModelConfig
from hafloc.descriptors.onnx_backend import cache_path, export_onnx
from hafloc.descriptors.runtime import OnnxRunner, TorchRunner, make_runner
from hafloc.errors import HaflocError
from hafloc.images.io import load_image, to_tensor

TOL = 1e-4


@pytest.fixture(scope="module")
def photos(shared_data):
    """Two photos of each of three landmarks, so retrieval among them has a right answer."""
    root = shared_data / "landmarks_mini" / "images"
    out = []
    for landmark in ("london_bridge", "piazza_san_marco", "sacre_coeur"):
        out += sorted(root.glob(f"{landmark}_*.jpg"))[:2]
    assert len(out) == 6
    return out


@pytest.fixture(scope="module")
def model_files(photos, tmp_path_factory):
    """haf and netvlad model files (16 clusters, max side 320) fitted on the photos."""
    folder = tmp_path_factory.mktemp("models")
    files = {}
    for method in ("haf", "netvlad"):
        cfg = ModelConfig.for_method(method, num_clusters=16)
        cfg.max_side = 320
        model = GeoLocNet(cfg, pretrained=True)
        fit_clusters(model, photos, progress=False)
        files[method] = save_model(model.eval(), folder / f"{method}.model")
    return files


def _top1(desc: np.ndarray) -> np.ndarray:
    sim = desc @ desc.T
    np.fill_diagonal(sim, -np.inf)  # each photo queries the other five
    return sim.argmax(axis=1)


@pytest.mark.parametrize("method", ["haf", "netvlad"])
def test_onnx_matches_torch_on_real_photos(method, model_files, photos):
    model = load_model(model_files[method])
    ours = Extractor(model, batch_size=4, backend="onnx")
    assert isinstance(ours.run, OnnxRunner)
    ref = Extractor(model, batch_size=4, backend="torch")
    a = ours.extract_paths(photos, progress=False)
    b = ref.extract_paths(photos, progress=False)
    assert a.names == b.names and a.descriptors.shape == (6, model.out_dim)
    assert np.abs(a.descriptors - b.descriptors).max() <= TOL
    assert (_top1(a.descriptors) == _top1(b.descriptors)).all()
    # the descriptors are informative, not constant: photos differ from each other
    assert (a.descriptors @ a.descriptors.T)[~np.eye(6, dtype=bool)].min() < 0.999
    # attention maps come back with the torch runner's levels and shapes
    img = load_image(photos[0])
    att_o, att_t = ours.describe_image(img)["attention"], ref.describe_image(img)["attention"]
    assert att_o.keys() == att_t.keys() == ({"low", "mid", "high"} if method == "haf" else set())
    for lv in att_o:
        assert att_o[lv].shape == att_t[lv].shape and np.abs(att_o[lv] - att_t[lv]).max() <= TOL


def test_one_export_serves_every_batch_and_image_size(model_files, photos, tmp_path):
    model = load_model(model_files["haf"])
    path = export_onnx(model, tmp_path / "haf.onnx")
    run_o, run_t = OnnxRunner(path), TorchRunner(model)
    imgs = [load_image(p) for p in photos]
    for size, n in (((224, 320), 1), ((320, 256), 3), ((160, 96), 2)):
        x = torch.stack([to_tensor(im, size=size) for im in imgs[:n]])
        o, t = run_o(x), run_t(x)
        assert o["descriptor"].shape == (n, model.out_dim)
        assert np.abs(o["descriptor"] - t["descriptor"]).max() <= TOL
        for lv, stride in (("low", 8), ("mid", 16), ("high", 32)):
            assert o["attention"][lv].shape == (n, size[0] // stride, size[1] // stride)


@pytest.mark.parametrize("method", ["crn", "gem", "superpoint", "gem+whitening"])
def test_every_method_exports_correctly(method, photos, tmp_path):
    # random heads (and a random whitening) are enough to check the graph computes the same function
    torch.manual_seed(0)
    method, _, whiten = method.partition("+")
    model = GeoLocNet(ModelConfig.for_method(method, num_clusters=8), pretrained=method != "superpoint").eval()
    if whiten:
        rng = np.random.default_rng(0)
        d = model.head.out_dim
        model.whitening.set(rng.normal(0, 0.01, d).astype(np.float32), rng.normal(0, 1, (32, d)).astype(np.float32))
        assert model.out_dim == 32
    path = export_onnx(model, tmp_path / f"{method}.onnx")
    onnx.checker.check_model(str(path))
    run_o, run_t = OnnxRunner(path), TorchRunner(model)
    for size, n in (((224, 320), 2), ((256, 192), 1)):
        x = torch.stack([to_tensor(load_image(p), size=size) for p in photos[:n]])
        o, t = run_o(x), run_t(x)
        assert np.abs(o["descriptor"] - t["descriptor"]).max() <= TOL
        assert o["attention"].keys() == t["attention"].keys()
        for lv in o["attention"]:
            assert np.abs(o["attention"][lv] - t["attention"][lv]).max() <= TOL


def test_cli_export_onnx_writes_a_valid_graph(model_files, tmp_path, capsys):
    out = tmp_path / "exported.onnx"
    assert main(["export-onnx", "--model", str(model_files["haf"]), "--output", str(out)]) == 0
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert [o.name for o in proto.graph.output] == ["descriptor", "attention_low", "attention_mid", "attention_high"]
    assert proto.opset_import[0].version >= 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    assert "wrote" in capsys.readouterr().out
    assert main(["export-onnx", "--model", str(tmp_path / "missing.model"), "--output", str(out)]) == 2


def test_onnx_metadata_tells_an_outside_client_how_to_feed_it(model_files, photos, tmp_path, capsys):
    """Read the preprocessing back with the onnx package, feed ONNX Runtime by it alone (PIL + numpy,
    no hafloc code) and get hafloc's own descriptor."""
    import json

    import onnxruntime as ort
    from PIL import Image, ImageOps

    model = load_model(model_files["haf"])
    out = tmp_path / "haf.onnx"
    assert main(["export-onnx", "--model", str(model_files["haf"]), "--output", str(out)]) == 0
    assert f"hafloc model info {out}" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["fingerprint"] == model.fingerprint() and meta["input_name"] == "image"
    assert meta["output_names"] == "descriptor,attention_low,attention_mid,attention_high"
    assert meta["color_order"] == "RGB" and meta["size_multiple"] == "32" and meta["max_side"] == "320"
    assert "[0, 1]" in meta["input_range"] and "do not normalise again" in meta["normalization"]
    np.testing.assert_allclose(json.loads(meta["normalization_mean"]), model.backbone.mean.flatten(), atol=1e-6)
    np.testing.assert_allclose(json.loads(meta["normalization_std"]), model.backbone.std.flatten(), atol=1e-6)
    # an outside client: EXIF orientation, longest side max_side, sides rounded to the multiple, RGB / 255
    img = ImageOps.exif_transpose(Image.open(photos[0])).convert("RGB")
    side, mult = int(meta["max_side"]), int(meta["size_multiple"])
    scale = side / max(img.size)
    w, h = (max(mult, round(v * scale / mult) * mult) for v in img.size)
    x = (np.asarray(img.resize((w, h), Image.BILINEAR), np.float32) / 255.0).transpose(2, 0, 1)[None]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    theirs = sess.run([meta["output_names"].split(",")[0]], {meta["input_name"]: x})[0][0]
    ours = Extractor(model, backend="torch").extract_paths([photos[0]], progress=False).descriptors[0]
    assert float(theirs @ ours) > 0.98  # same input rule (resampling details aside)
    # 'hafloc model info FILE.onnx' prints them
    assert main(["model", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"] == {"image": ["batch", 3, "height", "width"]} and info["fingerprint"] == model.fingerprint()
    assert info["normalization"] == meta["normalization"] and list(info["outputs"])[0] == "descriptor"
    assert info["outputs"]["descriptor"] == ["batch", model.out_dim]  # the real size, not a symbolic name
    assert sess.get_outputs()[0].shape == ["batch", model.out_dim]  # in the graph itself
    old = onnx.load(str(out))  # an export made before the size was fixed in the graph
    old.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "Divdescriptor_dim_1"
    onnx.save(old, str(tmp_path / "old.onnx"))
    assert main(["model", "info", str(tmp_path / "old.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"]["descriptor"] == ["batch", model.out_dim]
    assert main(["model", "info", str(out)]) == 0
    assert "input_size_rule: apply the EXIF orientation" in capsys.readouterr().out
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    assert main(["model", "info", str(tmp_path / "junk.onnx")]) == 2
    assert "junk.onnx: not a readable ONNX file" in capsys.readouterr().err


def test_cli_extract_onnx_backend_equals_torch(model_files, photos, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos[:4]:
        shutil.copy(p, folder / p.name)
    res = {}
    for backend in ("onnx", "torch"):
        out = tmp_path / f"{backend}.npz"
        assert (
            main(
                [
                    "extract",
                    "--model",
                    str(model_files["netvlad"]),
                    str(folder),
                    "--output",
                    str(out),
                    "--backend",
                    backend,
                    "--batch-size",
                    "2",
                    "--no-progress",
                ]
            )
            == 0
        )
        with np.load(out) as z:
            res[backend] = (z["names"].tolist(), z["descriptors"])
    assert res["onnx"][0] == res["torch"][0] and len(res["onnx"][0]) == 4
    assert np.abs(res["onnx"][1] - res["torch"][1]).max() <= TOL


def test_export_cache_is_reused_and_follows_the_model(model_files, photos, tmp_path):
    path = tmp_path / "m.model"
    shutil.copy(model_files["haf"], path)
    model = load_model(path)
    make_runner(model, "onnx")
    cached = cache_path(model)
    assert cached.parent == tmp_path and cached.name == f"m.model.{model.fingerprint()}.onnx"
    stamp = cached.stat().st_mtime_ns
    again = make_runner(load_model(path), "onnx")
    assert again.path == cached and cached.stat().st_mtime_ns == stamp  # not exported again

    # a changed model (new fusion weights) gets a new export; the stale one is removed
    model.head.set_fusion_weights([0.1, 0.4, 0.5])
    save_model(model, path)
    changed = load_model(path)
    run = make_runner(changed, "onnx")
    assert run.path != cached and run.path.is_file() and not cached.exists()
    x = to_tensor(load_image(photos[0]), max_side=320).unsqueeze(0)
    assert np.abs(run(x)["descriptor"] - TorchRunner(changed)(x)["descriptor"]).max() <= TOL

    # a damaged cache file is replaced, not trusted
    run.path.write_bytes(b"not onnx")
    fixed = make_runner(changed, "onnx")
    assert np.abs(fixed(x)["descriptor"] - TorchRunner(changed)(x)["descriptor"]).max() <= TOL


def test_models_without_a_file_are_cached_in_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = GeoLocNet(ModelConfig.for_method("gem"), pretrained=False).eval()
    run = make_runner(model, "onnx")
    assert run.path.parent == tmp_path / "cache" / "hafloc" / "onnx" and run.path.is_file()


def test_runtime_failure_falls_back_to_torch_only_when_allowed(tmp_path, monkeypatch, caplog):
    # SuperPoint's top-k is traced with k = keypoints: an image with fewer pixels than that
    # fails in ONNX Runtime, while eager torch takes all pixels.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = GeoLocNet(ModelConfig.for_method("superpoint", num_clusters=8, keypoints=2048), pretrained=False).eval()
    tiny = torch.rand(1, 3, 32, 32)
    strict = make_runner(model, "onnx")
    with pytest.raises(HaflocError, match="--backend torch"):
        strict(tiny)
    lenient = make_runner(model, "auto")
    with caplog.at_level("WARNING"):
        out = lenient(tiny)
        lenient(tiny)
    assert np.abs(out["descriptor"] - TorchRunner(model)(tiny)["descriptor"]).max() <= TOL
    assert sum("eager torch" in r.message for r in caplog.records) == 1  # one warning, not one per batch


def test_auto_backend_uses_onnx_runtime(model_files):
    ex = Extractor(load_model(model_files["netvlad"]), backend="auto")
    assert isinstance(ex.run, OnnxRunner)
    assert os.path.samefile(ex.run.path.parent, model_files["netvlad"].parent)

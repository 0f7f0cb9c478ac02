"""The VLAD heads' ONNX-friendly computation (position-major MatMuls, broadcast normalisation, VLAD of a
projected level computed in the tap's space, the attention's pooling exported without ceil mode; issue 14)
gives the descriptor and attention maps of the textbook computation, in eager torch and under ONNX
Runtime, on real photos with a fitted (sharp) soft assignment, a non-uniform attention and a perturbed
(full-rank) projection, at even and odd tap sizes."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from hafloc.descriptors.fit import fit_clusters
from hafloc.descriptors.network import GeoLocNet, ModelConfig
from hafloc.descriptors.onnx_backend import export_onnx
from hafloc.descriptors.runtime import session_options
from hafloc.heads.vlad import normalize_vlad
from hafloc.images.io import load_image, to_tensor

TOL = 1e-5


def reference_attention(attn, t: torch.Tensor) -> torch.Tensor:
    """The attention map as first written: ceil-mode average pooling, three context branches."""
    h, w = t.shape[-2:]
    y = F.avg_pool2d(t, 2, ceil_mode=True) if min(h, w) >= 4 else t
    y = torch.cat([F.relu(conv(y)) for conv in attn.context], dim=1)
    a = F.softplus(attn.combine(y))
    return F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False) if a.shape[-2:] != (h, w) else a


def reference_outputs(model: GeoLocNet, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The previous implementation, from the model's parameters: the projected map formed and normalised,
    channel-major (B,C,N) features, an einsum for the logits, softmax over the channel axis, a bmm with
    the transposed features. Returns (descriptor, {level: attention map})."""
    head = model.head
    taps = model.backbone(x)
    w = head.fusion_weights()
    vlads, maps = [], {}
    for i, lv in enumerate(head.levels):
        t = taps[lv]
        a = None
        if lv in head.attn:
            maps[lv] = reference_attention(head.attn[lv], t)
            a = maps[lv].flatten(2)
        y = head.proj[lv](t) if lv in head.proj else t
        feats = F.normalize(y, p=2, dim=1).flatten(2)
        vl = head.vlad[lv]
        logits = torch.einsum("kc,bcn->bkn", vl.assign.weight, feats) + vl.assign.bias.view(1, -1, 1)
        assign = logits.softmax(dim=1)
        if a is not None:
            assign = assign * a
        mass = assign.sum(dim=2)
        res = torch.bmm(assign, feats.transpose(1, 2)) - mass.unsqueeze(2) * vl.centroids.unsqueeze(0)
        flat = F.normalize(F.normalize(res, p=2, dim=2).flatten(1), p=2, dim=1)
        vlads.append(w[i].sqrt() * flat)
    return model.whitening(F.normalize(torch.cat(vlads, dim=1), p=2, dim=1)), maps


def reference_descriptor(model: GeoLocNet, x: torch.Tensor) -> torch.Tensor:
    return reference_outputs(model, x)[0]


@pytest.fixture(scope="module")
def fitted(shared_data, tmp_path_factory):
    """Paper-setting HAF (K=64, 128-D levels) fitted on real photos; attention and biases perturbed so
    that neither is the trivial uniform / zero of an untrained head."""
    root = shared_data / "landmarks_mini" / "images"
    photos = [
        p for lm in ("london_bridge", "piazza_san_marco", "sacre_coeur") for p in sorted(root.glob(f"{lm}_*.jpg"))[:2]
    ]
    assert len(photos) == 6
    cfg = ModelConfig.for_method("haf")
    cfg.max_side = 320
    torch.manual_seed(0)
    model = GeoLocNet(cfg, pretrained=True)
    fit_clusters(model, photos, progress=False)
    with torch.no_grad():
        for lv in model.head.levels:
            model.head.attn[lv].combine.weight.normal_(0, 0.2)
            model.head.vlad[lv].assign.bias.normal_(0, 0.5)
            # PCA fills only min(D, C) rows of a projection; training fills them all
            model.head.proj[lv].weight.add_(torch.randn_like(model.head.proj[lv].weight), alpha=0.05)
    model.head.set_fusion_weights([0.5, 0.3, 0.2])
    model.eval()
    x = torch.stack([to_tensor(load_image(p), size=(256, 320)) for p in photos])
    folder = tmp_path_factory.mktemp("onnx")
    return model, x, export_onnx(model, folder / "haf.onnx"), _export_reference(model, folder / "reference.onnx")


class _Reference(torch.nn.Module):
    def __init__(self, model: GeoLocNet):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        desc, maps = reference_outputs(self.model, image)
        return (desc,) + tuple(maps[lv][:, 0] for lv in maps)


def _export_reference(model: GeoLocNet, path):
    """The reference as a graph too: ONNX is compared with ONNX (same backbone kernels), torch with torch."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes about constant shapes
        torch.onnx.export(
            _Reference(model).eval(),
            (torch.rand(1, 3, 224, 320),),
            str(path),
            input_names=["image"],
            output_names=["descriptor", "attention_low", "attention_mid", "attention_high"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={"image": {0: "b", 2: "h", 3: "w"}},
        )
    return path


OUTPUTS = ["descriptor", "attention_low", "attention_mid", "attention_high"]


def _ort(path, x: torch.Tensor) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    return sess.run(OUTPUTS, {"image": x.numpy()})


def test_head_matches_reference_in_torch(fitted):
    model, x, _, _ = fitted
    with torch.inference_mode():
        ours = model(x)["descriptor"]
        ref = reference_descriptor(model, x)
    assert ours.shape == ref.shape == (6, model.out_dim)
    assert (ours - ref).abs().max().item() <= TOL
    # not a degenerate case: the soft assignment is sharp and the photos differ
    with torch.inference_mode():
        feats = model.head.local_features(model.backbone(x))["low"].transpose(1, 2)
        top = model.head.vlad["low"].soft_assign(feats).max(dim=2).values
    assert top.median().item() > 0.5
    assert (ours @ ours.T)[~torch.eye(6, dtype=torch.bool)].max().item() < 0.999


@pytest.mark.parametrize("size", [(256, 320), (224, 288)])  # taps 32x40/16x20/8x10; 28x36/14x18/7x9 (odd)
def test_head_matches_reference_under_onnx_runtime(fitted, size):
    model, x, ours_path, ref_path = fitted
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    ours, ref = _ort(ours_path, x), _ort(ref_path, x)
    assert ours[0].shape == ref[0].shape == (6, model.out_dim)
    assert np.abs(ours[0] - ref[0]).max() <= TOL
    for o, r, stride in zip(ours[1:], ref[1:], (8, 16, 32)):
        assert o.shape == r.shape == (6, size[0] // stride, size[1] // stride)
        assert np.abs(o - r).max() <= TOL * max(1.0, float(np.abs(r).max()))
        assert r.std() > 0.01  # the attention is not the flat map of an untrained head
    # the graph no longer expands the norm, nor pools in ceil mode (ONNX Runtime's slow path), nor forms
    # the stride-8 level's projected map (its only Conv is the attention's) to the feature map's shape, nor uses Einsum
    ops = {n.op_type for n in onnx.load(str(ours_path)).graph.node}
    assert "Einsum" not in ops and "Expand" not in ops
    graph = onnx.load(str(ours_path)).graph
    assert all(a.i == 0 for n in graph.node if n.op_type == "AveragePool" for a in n.attribute if a.name == "ceil_mode")
    assert not [n for n in graph.node if n.op_type == "Conv" and n.name.startswith("/model/head/low_")]


def test_projected_vlad_equals_projecting_first(fitted):
    """NetVLAD.aggregate_projected (in the tap's space) against projecting, normalising, then NetVLAD, with
    the level's attention, without weights, and with per-cluster weights: normalised residuals and mass."""
    model, x, _, _ = fitted
    head = model.head
    with torch.inference_mode():
        taps = model.backbone(x)
        for lv in head.levels:
            conv, vlad, t = head.proj[lv], head.vlad[lv], taps[lv]
            feats = F.normalize(conv(t), p=2, dim=1).flatten(2)
            att = head.attn[lv](t).flatten(2)
            per_cluster = torch.rand(
                t.shape[0], vlad.num_clusters, feats.shape[2], generator=torch.Generator().manual_seed(0)
            )
            for weights in (att, None, per_cluster):
                ref_res, ref_mass = vlad.aggregate(feats, weights)
                res, mass = vlad.aggregate_projected(t.flatten(2), conv.weight, conv.bias, weights)
                # raw residuals are differences of sums over ~1000 positions: compare what the descriptor uses
                pairs = zip(
                    ("intra", "vlad", "mass"), normalize_vlad(res) + (mass,), normalize_vlad(ref_res) + (ref_mass,)
                )
                for name, o, r in pairs:
                    assert o.shape == r.shape
                    assert (o - r).abs().max().item() <= TOL * max(1.0, r.abs().max().item()), (lv, name)

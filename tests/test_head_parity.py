"""The VLAD heads' ONNX-friendly computation (position-major MatMuls, broadcast normalisation; issue 14)
gives the descriptor of the textbook channel-major computation, in eager torch and under ONNX Runtime,
on real photos with a fitted (sharp) soft assignment and a non-uniform attention."""

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
from hafloc.images.io import load_image, to_tensor

TOL = 1e-5


def reference_descriptor(model: GeoLocNet, x: torch.Tensor) -> torch.Tensor:
    """The previous implementation, from the model's parameters: channel-major (B,C,N) features, an
    einsum for the logits, softmax over the channel axis, a bmm with the transposed features."""
    head = model.head
    taps = model.backbone(x)
    w = head.fusion_weights()
    vlads = []
    for i, lv in enumerate(head.levels):
        t = taps[lv]
        a = head.attn[lv](t).flatten(2) if lv in head.attn else None
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
    return model.whitening(F.normalize(torch.cat(vlads, dim=1), p=2, dim=1))


@pytest.fixture(scope="module")
def fitted(shared_data, tmp_path_factory):
    """Paper-setting HAF (K=64, 128-D levels) fitted on real photos; attention and biases perturbed so
    that neither is the trivial uniform / zero of an untrained head."""
    root = shared_data / "landmarks_mini" / "images"
    photos = [p for lm in ("london_bridge", "piazza_san_marco", "sacre_coeur") for p in sorted(root.glob(f"{lm}_*.jpg"))[:2]]
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
    model.head.set_fusion_weights([0.5, 0.3, 0.2])
    model.eval()
    x = torch.stack([to_tensor(load_image(p), size=(256, 320)) for p in photos])
    folder = tmp_path_factory.mktemp("onnx")
    return model, x, export_onnx(model, folder / "haf.onnx"), _export_reference(model, folder / "reference.onnx")


class _Reference(torch.nn.Module):
    def __init__(self, model: GeoLocNet):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return reference_descriptor(self.model, image)


def _export_reference(model: GeoLocNet, path):
    """The reference as a graph too: ONNX is compared with ONNX (same backbone kernels), torch with torch."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes about constant shapes
        torch.onnx.export(_Reference(model).eval(), (torch.rand(1, 3, 224, 320),), str(path), input_names=["image"],
                          output_names=["descriptor"], opset_version=17, dynamo=False,
                          dynamic_axes={"image": {0: "b", 2: "h", 3: "w"}})
    return path


def _ort(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    return sess.run(["descriptor"], {"image": x.numpy()})[0]


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


def test_head_matches_reference_under_onnx_runtime(fitted):
    model, x, ours_path, ref_path = fitted
    ours, ref = _ort(ours_path, x), _ort(ref_path, x)
    assert ours.shape == ref.shape == (6, model.out_dim)
    assert np.abs(ours - ref).max() <= TOL
    # the graph no longer expands the norm to the feature map's shape, nor uses Einsum
    ops = {n.op_type for n in onnx.load(str(ours_path)).graph.node}
    assert "Einsum" not in ops and "Expand" not in ops

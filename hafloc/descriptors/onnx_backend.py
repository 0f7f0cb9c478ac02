"""ONNX export of a GeoLocNet and its cache (the runner is ``runtime.OnnxRunner``).

The exported graph takes ``image`` (B,3,H,W) float32 RGB in [0,1] (B, H and W dynamic; H and W
multiples of 32) and returns ``descriptor`` (B,D) plus ``attention_<level>`` (B,h,w) for every
level that has an attention map: the same contract as the eager ``runtime.TorchRunner``.

Exports are cached next to the model file as ``MODEL.<fingerprint>.onnx`` (or under
``$XDG_CACHE_HOME/hafloc/onnx`` when that folder is not writable or the model has no file), so
a changed model gets a fresh export and an unchanged one is never exported twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from .._version import __version__
from ..errors import HaflocError, InputError
from ..fileio import atomic_path
from .modelfile import DEFAULT_FILE
from .network import GeoLocNet

log = logging.getLogger(__name__)

OPSET = 17
# Bump when the exported graph changes for an unchanged model (fingerprints cover weights and
# configuration, not code).
EXPORT_VERSION = "3"  # 2: preprocessing metadata in metadata_props; 3: leaner HAF head graph (issue 14)
_SAMPLE_SIZE = (224, 320)  # tracing input; every size is dynamic in the graph


def output_names(model: GeoLocNet) -> list[str]:
    """``descriptor`` then ``attention_<level>`` for each level with an attention map."""
    was_training = model.training
    try:
        with torch.inference_mode():
            att = model.eval()(torch.zeros(1, 3, 64, 64))["attention"]
    finally:
        model.train(was_training)
    return ["descriptor"] + [f"attention_{lv}" for lv in att]


class _Exportable(nn.Module):
    """Dict outputs -> a flat tuple (ONNX needs positional outputs)."""

    def __init__(self, model: GeoLocNet, levels: list[str]):
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, image: torch.Tensor):
        out = self.model(image)
        return (out["descriptor"],) + tuple(out["attention"][lv][:, 0] for lv in self.levels)


def export_onnx(model: GeoLocNet, path: str | Path, opset: int = OPSET, check: bool = True) -> Path:
    """Write ``model`` as ONNX (dynamic batch/height/width) atomically; validate with onnx.checker."""
    if opset < 17:
        raise HaflocError(f"ONNX export needs opset 17 or newer (got {opset})")
    path = Path(path)
    names = output_names(model)
    levels = [n.removeprefix("attention_") for n in names[1:]]
    dynamic = {"image": {0: "batch", 2: "height", 3: "width"}, "descriptor": {0: "batch"}}
    for n in names[1:]:
        dynamic[n] = {0: "batch", 1: f"{n}_h", 2: f"{n}_w"}
    # Built in eval mode: the exporter restores the wrapper's mode onto every submodule afterwards,
    # so a wrapper left in training mode would silently flip the model's BatchNorms to training.
    wrapper = _Exportable(model, levels).eval()
    was_training = model.training
    model.eval()
    try:
        with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about constant shapes are expected
            torch.onnx.export(
                wrapper,
                (torch.rand(1, 3, *_SAMPLE_SIZE),),
                str(tmp),
                input_names=["image"],
                output_names=names,
                dynamic_axes=dynamic,
                opset_version=opset,
                dynamo=False,
            )
            proto = onnx.load(str(tmp))
            meta = {
                "hafloc": __version__,
                "export_version": EXPORT_VERSION,
                "fingerprint": model.fingerprint(),
                "method": model.config.method,
                "backbone": model.config.backbone,
                **preprocessing_metadata(model, names),
            }
            for k, v in meta.items():
                proto.metadata_props.add(key=k, value=str(v))
            for v in proto.graph.output:  # the tracer names the size after an op ('Divdescriptor_dim_1')
                if v.name == "descriptor":
                    v.type.tensor_type.shape.dim[1].dim_value = model.out_dim
            if check:
                onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
    finally:
        model.train(was_training)
    return path


def preprocessing_metadata(model: GeoLocNet, outputs: list[str] | None = None) -> dict[str, str]:
    """How an outside client must feed the graph, as ONNX ``metadata_props`` (all strings).

    The backbone normalises inside the graph (``backbones.base.Backbone``), so a client only
    decodes, orients, resizes and scales to [0, 1]; the keys say exactly that.
    """
    bb = model.backbone
    mean = [round(float(v), 6) for v in bb.mean.flatten()]
    std = [round(float(v), 6) for v in bb.std.flatten()]
    gray = model.config.backbone == "superpoint"
    return {
        "input_name": "image",
        "input_layout": "float32 (batch, 3, height, width), NCHW; batch, height and width dynamic",
        "color_order": "RGB" + (" (converted to gray inside the graph: 0.299 R + 0.587 G + 0.114 B)" if gray else ""),
        "input_range": "[0, 1]: 8-bit pixel values divided by 255",
        "normalization": (
            f"inside the graph: (x - mean) / std per channel, mean={mean}, std={std} "
            f"({model.config.backbone} backbone); feed [0, 1] RGB, do not normalise again"
        ),
        "normalization_mean": json.dumps(mean),
        "normalization_std": json.dumps(std),
        "input_size_rule": (
            "apply the EXIF orientation; scale keeping the aspect ratio so that the longest side "
            "is max_side; round height and width each to the nearest multiple of 32 (at least 32); "
            "resize bilinearly to that size"
        ),
        "size_multiple": "32",
        "max_side": str(int(model.config.max_side)),
        "output_names": ",".join(outputs if outputs is not None else output_names(model)),
        "descriptor": (
            f"'descriptor' (batch, {model.out_dim}) float32, L2-normalised"
            + (", PCA-whitened" if model.whitening.dim else "")
            + ": similarity = inner product"
        ),
    }


def onnx_info(path: str | Path) -> dict:
    """What an exported ONNX file says about itself: inputs, outputs, opset and its metadata_props."""
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except Exception as err:  # protobuf DecodeError and friends
        raise InputError(path, f"not a readable ONNX file ({type(err).__name__})") from None

    def shape(v) -> list:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    meta = {p.key: p.value for p in proto.metadata_props}
    outputs = {v.name: shape(v) for v in proto.graph.output}
    size = re.match(r"'descriptor' \(batch, (\d+)\)", meta.get("descriptor", ""))
    if size and len(outputs.get("descriptor", [])) == 2 and isinstance(outputs["descriptor"][1], str):
        outputs["descriptor"][1] = int(size.group(1))  # an earlier export's symbolic name: the real size
    info: dict = {
        "file": str(path),
        "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "inputs": {v.name: shape(v) for v in proto.graph.input},
        "outputs": outputs,
    }
    if not meta.get("fingerprint"):
        info["note"] = "not exported by hafloc (no preprocessing metadata)"
    info.update(meta)
    return info


def _writable_dir(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hafloc" / "onnx"


def cache_path(model: GeoLocNet, fingerprint: str | None = None) -> Path:
    """Where the export of ``model`` lives: beside its model file when possible, else the cache dir."""
    fp = fingerprint or model.fingerprint()
    if model.source_path:
        src = Path(model.source_path)
        if _writable_dir(src.parent) and src != DEFAULT_FILE:  # never write into the installed package
            return src.parent / f"{src.name}.{fp}.onnx"
        return cache_dir() / f"{src.name}.{fp}.onnx"
    return cache_dir() / f"{model.config.method}.{fp}.onnx"


def cached_export(model: GeoLocNet) -> Path:
    """The cached ONNX file of ``model``, exporting it first when absent or stale."""
    fp = model.fingerprint()
    path = cache_path(model, fp)
    if path.is_file():
        meta = _metadata_fast(path)
        if meta.get("fingerprint") == fp and meta.get("export_version") == EXPORT_VERSION:
            return path
        log.info("re-exporting stale ONNX cache %s", path)
    log.info("exporting %s model to ONNX: %s", model.config.method, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, path)
    _remove_stale_siblings(path, fp)
    return path


def _metadata_fast(path: Path) -> dict[str, str]:
    """Metadata of an ONNX file without building a session (weights are not parsed twice)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # a damaged cache file only costs a re-export
        return {}
    return {p.key: p.value for p in proto.metadata_props}


def _remove_stale_siblings(path: Path, fp: str) -> None:
    """Drop exports of earlier versions of the same model file (``NAME.<other fp>.onnx``)."""
    stem = path.name[: -len(f".{fp}.onnx")]
    pattern = re.compile(re.escape(stem) + r"\.[0-9a-f]{16}\.onnx")
    for other in path.parent.glob(f"{stem}.*.onnx"):
        if other != path and pattern.fullmatch(other.name):
            try:
                other.unlink()
            except OSError:
                pass

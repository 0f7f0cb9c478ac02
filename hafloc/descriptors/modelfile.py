"""The model file: one ``torch.save`` of plain data (config, weights incl. clusters, fusion
weights and whitening, metadata), loaded with ``weights_only=True``.

A file may leave the backbone out (``save_model(..., trunk="pretrained")``): it then holds only
what differs from the pretrained trunk of the backbone's package (head, whitening), optionally in
float16, plus a digest of that trunk, checked when the file is loaded. The shipped default model
(``DEFAULT``, the name ``default`` wherever a model file is asked for) is such a file, inside the
package, checked against ``DEFAULT_SHA256`` at load.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..errors import InputError
from ..fileio import atomic_path
from .network import GeoLocNet, ModelConfig

FORMAT = "hafloc-model"
VERSION = 1

# The shipped default model: HAF trained on real street views (its card: `hafloc model info default`).
DEFAULT = "default"
DEFAULT_FILE = Path(__file__).resolve().parent / "default" / "haf-streets.model"
DEFAULT_SHA256 = "ed1636088afac9a774040067c40be686ea4040a808a0e2244352d1da09c2bee8"  # scripts/package_default_model.py


def trunk_digest(model: GeoLocNet) -> str:
    """Digest of the backbone's weights (what a trunk-less model file relies on)."""
    h = hashlib.sha256()
    for k, v in sorted(model.backbone.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_model(
    model: GeoLocNet, path: str | Path, meta: dict | None = None, trunk: str = "included", half: bool = False
) -> Path:
    """Write ``model``; ``trunk="pretrained"`` leaves out the backbone (rebuilt from its package at
    load), ``half`` stores floating-point weights as float16."""
    if trunk not in ("included", "pretrained"):
        raise ValueError(f"trunk must be 'included' or 'pretrained', got {trunk!r}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if trunk == "pretrained":
        state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "hafloc": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": model.config.to_dict(),
        "state_dict": state,
        "meta": meta or {},
    }
    if trunk == "pretrained":
        payload["trunk"] = {"source": "pretrained", "digest": trunk_digest(model)}
    payload["config"]["whiten_dim"] = model.whitening.dim
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def resolve_model_path(path: str | Path | None) -> Path:
    """A model file's path; None or ``default`` (when no such file exists here) = the shipped model,
    whose sha256 is checked."""
    if path is not None and (str(path) != DEFAULT or Path(path).exists()):
        return Path(path)
    if not DEFAULT_FILE.is_file():
        raise InputError(DEFAULT_FILE, "the default model is missing from this installation (reinstall hafloc)")
    digest = hashlib.sha256(DEFAULT_FILE.read_bytes()).hexdigest()
    if digest != DEFAULT_SHA256:
        raise InputError(
            DEFAULT_FILE, f"the default model is damaged (sha256 {digest[:12]}..., expected {DEFAULT_SHA256[:12]}...)"
        )
    return DEFAULT_FILE


def recorded_path(model: GeoLocNet) -> str | None:
    """How an index records the file ``model`` was loaded from: ``default`` for the shipped model."""
    src = model.source_path
    return DEFAULT if src and Path(src) == DEFAULT_FILE else src


def read_model_file(path: str | Path | None) -> dict:
    path = resolve_model_path(path)
    if not path.is_file():
        raise InputError(path, "model file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "empty model file (0 bytes)")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise InputError(path, "not a hafloc model file (not a zip archive, as torch.save writes)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a refusal of non-tensor objects; torch's text advises weights_only=False
        raise InputError(
            path, "not a hafloc model file (it holds Python objects, not only tensors and plain data; never loaded)"
        ) from None
    except Exception as err:  # zip errors; torch's text is advice for torch users, not ours
        cause = f"damaged or truncated archive: {type(err).__name__}"
        raise InputError(path, f"not a hafloc model file ({cause})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(path, "not a hafloc model file (no 'hafloc-model' header)")
    if payload.get("version", 0) > VERSION:
        raise InputError(
            path, f"model file version {payload['version']} is newer than this hafloc supports ({VERSION})"
        )
    return payload


def load_model(path: str | Path | None = None) -> GeoLocNet:
    """Rebuild the network from a model file (None or ``default``: the shipped default model).

    A file holding its trunk reads no backbone weights from elsewhere; a trunk-less one takes the
    pretrained backbone of its package and refuses one whose weights differ from those it was
    saved with."""
    path = resolve_model_path(path)
    payload = read_model_file(path)
    config = ModelConfig.from_dict(payload["config"], source=path)
    trunk = payload.get("trunk")
    model = GeoLocNet(config, pretrained=trunk is not None)
    state = payload["state_dict"]
    reference = model.state_dict()
    if trunk is not None:
        digest = trunk_digest(model)
        if digest != trunk.get("digest"):
            raise InputError(
                path,
                f"saved for other {config.backbone} weights than the installed package's "
                f"(trunk {digest} vs {trunk.get('digest')}); install the versions of requirements.lock",
            )
        state = {**{k: v for k, v in reference.items() if k.startswith("backbone.")}, **state}
    # float16 storage back to the network's dtypes
    state = {k: v.to(reference[k].dtype) if k in reference and v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(path, f"weights do not match the stored configuration ({str(err).splitlines()[0]})") from None
    model.meta = payload.get("meta", {})
    model.source_path = str(path)
    return model.eval()


def model_info(path: str | Path | None) -> dict:
    path = resolve_model_path(path)  # the default's sha256 is checked once
    payload = read_model_file(path)
    model = load_model(path)
    n_params = sum(v.numel() for v in model.state_dict().values())
    info = {
        "file": str(path),
        "default": path == DEFAULT_FILE,
        "hafloc": payload.get("hafloc"),
        "created": payload.get("created"),
        "fingerprint": model.fingerprint(),
        "method": model.config.method,
        "backbone": model.config.backbone,
        "levels": list(model.levels),
        "taps": {
            lv: {"channels": model.backbone.channels.get(lv), "stride": model.backbone.strides.get(lv)}
            for lv in model.levels
        },
        "head": model.config.to_dict()["head"],
        "descriptor_dim": model.out_dim,
        "head_dim": model.head.out_dim,
        "whitening": model.whitening.dim,
        "fusion_weights": [round(float(w), 4) for w in model.head.fusion_weights().detach()],
        "max_side": model.config.max_side,
        "parameters": n_params,
        "stored": {
            "trunk": "pretrained (from the backbone's package)" if payload.get("trunk") else "included",
            "dtype": sorted({str(v.dtype).replace("torch.", "") for v in payload["state_dict"].values()}),
            "bytes": path.stat().st_size,
        },
        "meta": payload.get("meta", {}),
    }
    return info

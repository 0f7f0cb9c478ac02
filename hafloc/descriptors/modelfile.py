"""The model file: one ``torch.save`` of plain data (config, weights incl. clusters, fusion
weights and whitening, metadata), loaded with ``weights_only=True``."""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import InputError
from ..fileio import atomic_path
from .network import GeoLocNet, ModelConfig

FORMAT = "hafloc-model"
VERSION = 1


def save_model(model: GeoLocNet, path: str | Path, meta: dict | None = None) -> Path:
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "hafloc": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    payload["config"]["whiten_dim"] = model.whitening.dim
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_model_file(path: str | Path) -> dict:
    path = Path(path)
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


def load_model(path: str | Path) -> GeoLocNet:
    """Rebuild the network from a model file (no backbone weights are read from elsewhere)."""
    payload = read_model_file(path)
    config = ModelConfig.from_dict(payload["config"], source=path)
    model = GeoLocNet(config, pretrained=False)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise InputError(path, f"weights do not match the stored configuration ({str(err).splitlines()[0]})") from None
    model.meta = payload.get("meta", {})
    model.source_path = str(path)
    return model.eval()


def model_info(path: str | Path) -> dict:
    payload = read_model_file(path)
    model = load_model(path)
    n_params = sum(v.numel() for v in payload["state_dict"].values())
    info = {
        "file": str(path),
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
        "meta": payload.get("meta", {}),
    }
    return info

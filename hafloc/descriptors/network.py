"""GeoLocNet: backbone (three taps, one pass) + head + optional PCA whitening."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones import Backbone, create_backbone
from ..backbones.superpoint import SuperPointNet
from ..configs import from_mapping
from ..errors import HaflocError
from ..heads import METHODS, HeadConfig, create_head, head_config
from .whitening import Whitening

# Settings that model files of older versions may hold but ModelConfig / HeadConfig no longer have:
# such files still load (the value is ignored). Add a key here when removing a field.
LEGACY_KEYS: frozenset[str] = frozenset()
LEGACY_HEAD_KEYS: frozenset[str] = frozenset()


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (saved in every model file and result folder)."""

    method: str = "haf"
    backbone: str = "efficientnet-lite0"
    head: HeadConfig = field(default_factory=HeadConfig)
    whiten_dim: int | None = None
    max_side: int = 640  # extraction: longest image side, then rounded to multiples of 32

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str | Path | None = None) -> "ModelConfig":
        """Strict: an unknown key (of the model or its head) is an error naming it and ``source``
        (the model file); keys of older files listed in ``LEGACY_KEYS`` are ignored."""
        d = dict(d)
        h = dict(d.pop("head", {}))
        for key in ("levels", "init_weights"):
            if key in h:
                h[key] = tuple(h[key])
        head = from_mapping(HeadConfig, h, source=source, what="head setting", legacy=LEGACY_HEAD_KEYS)
        return from_mapping(cls, {**d, "head": head}, source=source, what="model setting", legacy=LEGACY_KEYS)

    @classmethod
    def for_method(cls, method: str, backbone: str | None = None, **head_overrides) -> "ModelConfig":
        if method not in METHODS:
            raise HaflocError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if method == "superpoint":
            backbone = "superpoint"
        elif backbone == "superpoint":
            raise HaflocError("the superpoint backbone goes with --method superpoint only")
        return cls(method=method, backbone=backbone or "efficientnet-lite0", head=head_config(method, **head_overrides))


class GeoLocNet(nn.Module):
    """``meta`` (what the model file recorded: fitting, training, tuning) and ``source_path`` (the
    file it was loaded from) are set by ``modelfile.load_model``; a model built here has neither."""

    def __init__(self, config: ModelConfig, pretrained: bool = True, backbone_weights: str | None = None):
        super().__init__()
        self.config = config
        self.meta: dict[str, Any] = {}
        self.source_path: str | None = None
        self.backbone: Backbone
        if config.backbone == "superpoint":
            self.backbone = SuperPointNet()
            if pretrained:
                self.backbone.load_pretrained(backbone_weights)
        else:
            self.backbone = create_backbone(config.backbone, backbone_weights, pretrained=pretrained)
        self.head = create_head(config.method, self.backbone.channels, config.head)
        self.whitening = Whitening(self.head.out_dim, config.whiten_dim)

    @property
    def levels(self) -> tuple[str, ...]:
        return self.head.levels

    @property
    def out_dim(self) -> int:
        return self.whitening.dim or self.head.out_dim

    def forward(self, x: torch.Tensor) -> dict:
        """(B,3,H,W) RGB in [0,1] -> head outputs + ``raw`` (pre-whitening) + whitened ``descriptor``."""
        return self.forward_taps(self.backbone(x))

    def forward_taps(self, taps: dict[str, torch.Tensor]) -> dict:
        """The head and whitening on backbone taps (``forward`` without the backbone)."""
        out = self.head(taps)
        out["raw"] = out["descriptor"]
        out["descriptor"] = self.whitening(out["raw"])
        return out

    def fingerprint(self) -> str:
        """Stable digest of configuration and every weight: identifies the descriptor space."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

"""GeM pooling of the high level: the simplest reference (Radenovic et al., TPAMI 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Head, HeadConfig


class GeM(Head):
    def __init__(self, channels: dict[str, int], conf: HeadConfig):
        super().__init__()
        self.levels = ("high",)
        self.p = nn.Parameter(torch.tensor(float(conf.gem_p)))
        self.out_dim = channels["high"]

    def local_features(self, taps):
        return {"high": F.normalize(taps["high"], dim=1).flatten(2)}

    def forward(self, taps):
        x = taps["high"].clamp(min=1e-6).pow(self.p)
        pooled = x.mean(dim=(2, 3)).pow(1.0 / self.p)
        return {"descriptor": F.normalize(pooled, p=2, dim=1), "attention": {}}

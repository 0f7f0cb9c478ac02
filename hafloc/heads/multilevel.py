"""VLAD heads: HAF (three levels, attention, fusion) and its single-level cousins NetVLAD / CRN.

One class covers all three because they differ only in configuration: NetVLAD = one level, no
attention; CRN = one level with a contextual reweighting mask; HAF = three levels, a mask per
level, 1x1 projection and fusion with adaptive weights w_l:

    fused = concat_l sqrt(w_l) V_l  =>  cos(fused_q, fused_r) = sum_l w_l cos(V_l^q, V_l^r)
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HaflocError
from .attention import ContextAttention
from .base import Head, HeadConfig
from .export_ops import flatten_spatial
from .vlad import NetVLAD, l2_normalize


class MultiLevelVLAD(Head):
    uses_clusters = True

    def __init__(self, channels: dict[str, int], conf: HeadConfig):
        super().__init__()
        self.conf = conf
        self.levels = tuple(conf.levels)
        if len(self.levels) > 1 and conf.proj_dim is None:
            raise HaflocError("a multi-level VLAD head needs proj_dim (levels must share one dimension)")
        dims = {lv: conf.proj_dim or channels[lv] for lv in self.levels}
        self.proj = nn.ModuleDict(
            {lv: nn.Conv2d(channels[lv], dims[lv], 1) for lv in self.levels} if conf.proj_dim else {}
        )
        self.attn = nn.ModuleDict({lv: ContextAttention(channels[lv]) for lv in self.levels} if conf.attention else {})
        self.vlad = nn.ModuleDict({lv: NetVLAD(conf.num_clusters, dims[lv]) for lv in self.levels})
        w = conf.init_weights or (1.0 / len(self.levels),) * len(self.levels)
        # softmax(logits) = w; learnable in training, re-tuned per benchmark afterwards
        self.fusion_logits = nn.Parameter(
            torch.log(torch.tensor(w, dtype=torch.float32).clamp_min(1e-6)), requires_grad=len(self.levels) > 1
        )
        self.out_dim = sum(conf.num_clusters * dims[lv] for lv in self.levels)

    def fusion_weights(self) -> torch.Tensor:
        return self.fusion_logits.softmax(dim=0)

    @torch.no_grad()
    def set_fusion_weights(self, weights: list[float] | tuple[float, ...]) -> None:
        w = torch.tensor(weights, dtype=torch.float32)
        if w.numel() != len(self.levels) or (w < 0).any() or abs(float(w.sum()) - 1) > 1e-4:
            raise HaflocError(
                f"fusion weights must be {len(self.levels)} non-negative numbers summing to 1, got {list(weights)}"
            )
        self.fusion_logits.copy_(torch.log(w.clamp_min(1e-6)))

    def _project(self, lv: str, x: torch.Tensor) -> torch.Tensor:
        if lv in self.proj:
            x = self.proj[lv](x)
        return flatten_spatial(l2_normalize(x, dim=1))

    def local_features(self, taps):
        return {lv: self._project(lv, taps[lv]) for lv in self.levels}

    @torch.no_grad()
    def set_projection(self, level: str, components: np.ndarray, mean: np.ndarray) -> None:
        """Initialise the 1x1 projection as PCA: y = P (x - m)."""
        conv = cast(nn.Conv2d, self.proj[level])
        assert conv.bias is not None  # the projections are Conv2d(bias=True)
        p = torch.from_numpy(components.astype(np.float32))
        conv.weight.copy_(p.view(*conv.weight.shape))
        conv.bias.copy_(-(p @ torch.from_numpy(mean.astype(np.float32))))

    def forward(self, taps: dict[str, torch.Tensor]) -> dict:
        w = self.fusion_weights()
        residuals, masses, attention = [], [], {}
        for lv in self.levels:
            x = taps[lv]
            a = self.attn[lv](x) if lv in self.attn else None
            if a is not None:
                attention[lv] = a
            weights = flatten_spatial(a) if a is not None else None
            conv = cast(nn.Conv2d, self.proj[lv]) if lv in self.proj else None
            vlad = cast(NetVLAD, self.vlad[lv])
            if conv is not None and conv.bias is not None and conv.in_channels < conv.out_channels:
                # same result, without forming the projected map (NetVLAD.aggregate_projected)
                r, m = vlad.aggregate_projected(flatten_spatial(x), conv.weight, conv.bias, weights)
            else:
                r, m = vlad.aggregate(self._project(lv, x), weights)
            residuals.append(r)
            masses.append(m)
        # Levels share K and D, so all are normalised at once (fewer graph nodes than one pass per level):
        # intra-normalise each cluster, L2 each level's flattened vector, scale it by sqrt(w_l).
        first = cast(NetVLAD, self.vlad[self.levels[0]])
        n_lv, k, d = len(self.levels), first.num_clusters, first.dim  # Python ints: constant reshapes
        intra = l2_normalize(torch.cat(residuals, dim=1), dim=2)  # (B, L*K, D)
        s = w.sqrt()
        vlads = l2_normalize(intra.reshape(-1, n_lv, k * d), dim=2) * s.unsqueeze(1)  # (B, L, K*D)
        # each V_l is unit-norm and sum w_l = 1, so this normalisation only guards empty images
        descriptor = l2_normalize(vlads.reshape(-1, n_lv * k * d), dim=1)
        return {
            "descriptor": descriptor,
            "attention": attention,
            "scores": torch.cat(masses, dim=1),
            "residuals": (intra.reshape(-1, n_lv, k, d) * s.view(1, n_lv, 1, 1)).reshape(-1, n_lv * k, d),
            "level_descriptors": [F.normalize(vlads[:, i], dim=1) for i in range(n_lv)],
        }

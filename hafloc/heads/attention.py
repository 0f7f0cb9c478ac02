"""Per-level spatial attention with multi-scale context (CRN-style)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .export_ops import ceil_avg_pool2, resize_like


class ContextAttention(nn.Module):
    """Non-negative spatial map a(x) from a feature map, with context filters of growing size.

    As CRN (Kim et al., CVPR 2017): average-pool by 2, 3x3 / 5x5 / 7x7 context filters (32/32/20
    channels), ReLU, a 1x1 combination, softplus, upsampled back to the input grid. Our context
    filters are depthwise-separable (a kxk per channel, then a 1x1): the dense 7x7 filters cost
    more than the whole VLAD on the stride-8 level, this costs ~10x less for the same receptive
    field. The last layer starts at zero weight with softplus(bias) = 1, so an untrained model
    attends uniformly (it is plain multi-level NetVLAD) and training moves away from that.
    """

    def __init__(self, channels: int, widths: tuple[int, int, int] = (32, 32, 20)):
        super().__init__()
        self.context = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, bias=False), nn.Conv2d(channels, w, 1)
            )
            for w, k in zip(widths, (3, 5, 7))
        )
        self.combine = nn.Conv2d(sum(widths), 1, 1)
        nn.init.zeros_(self.combine.weight)
        assert self.combine.bias is not None  # Conv2d(bias=True), for the type checker
        nn.init.constant_(self.combine.bias, math.log(math.e - 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1, H, W) >= 0."""
        h, w = x.shape[-2:]
        y = ceil_avg_pool2(x) if min(h, w) >= 4 else x
        y = torch.cat([F.relu(conv(y)) for conv in self.context], dim=1)
        a = F.softplus(self.combine(y))
        return resize_like(a, x) if a.shape[-2:] != (h, w) else a

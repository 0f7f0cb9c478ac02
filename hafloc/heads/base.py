"""Head interface: backbone taps -> global descriptor (+ attention, + per-cluster terms)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class HeadConfig:
    """Hyper-parameters of a head. ``METHOD_DEFAULTS`` holds each method's paper setting."""

    levels: tuple[str, ...] = ("low", "mid", "high")
    num_clusters: int = 64
    proj_dim: int | None = 128  # 1x1 projection per level (None: use the tap's channels)
    attention: bool = True
    gem_p: float = 3.0
    keypoints: int = 1024  # superpoint: keypoints kept per image
    nms_radius: int = 4
    keypoint_threshold: float = 0.005
    init_weights: tuple[float, ...] = field(default=())  # fusion w1..wL; () = uniform


METHOD_DEFAULTS: dict[str, HeadConfig] = {
    "haf": HeadConfig(),
    "netvlad": HeadConfig(levels=("high",), proj_dim=None, attention=False),
    "crn": HeadConfig(levels=("high",), proj_dim=None, attention=True),
    "gem": HeadConfig(levels=("high",), proj_dim=None, attention=False),
    "superpoint": HeadConfig(levels=("high",), proj_dim=None, attention=False),
}


class Head(nn.Module):
    """Base class. ``forward(taps)`` returns a dict with

    - ``descriptor`` (B, out_dim), L2-normalised;
    - ``attention`` {level: (B, 1, h, w)} (empty when the method has none);
    - for VLAD heads ``scores`` (B, K_total): attention-weighted assignment mass per cluster, and
      ``residuals`` (B, K_total, D): intra-normalised residuals scaled by sqrt(w_l) (dD loss).
    """

    out_dim: int
    levels: tuple[str, ...]
    uses_clusters: bool = False

    def fusion_weights(self) -> torch.Tensor:
        return torch.ones(1)

    def raw_features(self, taps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{level: (B, C, N)} features before any learned projection (for PCA init)."""
        return {lv: taps[lv].flatten(2) for lv in self.levels}

    def local_features(self, taps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{level: (B, D, N)} the features that clusters live in (for k-means init)."""
        raise NotImplementedError

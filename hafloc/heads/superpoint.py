"""SuperPoint keypoints + descriptors aggregated into one global VLAD descriptor."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import HeadConfig
from .multilevel import MultiLevelVLAD


def keypoint_heatmap(semi: torch.Tensor) -> torch.Tensor:
    """Detector logits (B,65,h,w) -> full-resolution probability map (B,1,8h,8w)."""
    prob = semi.softmax(dim=1)[:, :-1]  # drop the "no keypoint" dustbin
    return F.pixel_shuffle(prob, 8)


def nms_topk(heat: torch.Tensor, k: int, radius: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-pool NMS then the top-k scores: returns (scores (B,k) zeroed below threshold, flat idx (B,k))."""
    local_max = F.max_pool2d(heat, 2 * radius + 1, stride=1, padding=radius)
    kept = torch.where((heat == local_max) & (heat > threshold), heat, torch.zeros_like(heat))
    k = min(k, kept.shape[-1] * kept.shape[-2])
    return kept.flatten(1).topk(k, dim=1)


def sample_descriptors(desc: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Unit descriptors (B,D,k) read bilinearly from ``desc`` at pixel centres (xs, ys) (B,k) of an (h, w) image."""
    h, w = size
    grid = torch.stack([(xs + 0.5) / w * 2 - 1, (ys + 0.5) / h * 2 - 1], dim=-1).unsqueeze(1)
    sampled = F.grid_sample(desc, grid, mode="bilinear", align_corners=False).squeeze(2)
    return F.normalize(sampled, p=2, dim=1)


class SuperPointVLAD(MultiLevelVLAD):
    """VLAD over SuperPoint descriptors sampled (bilinearly) at NMS keypoints, weighted by score."""

    def __init__(self, channels: dict[str, int], conf: HeadConfig):
        super().__init__(
            channels,
            HeadConfig(
                levels=("high",),
                num_clusters=conf.num_clusters,
                proj_dim=None,
                attention=False,
                keypoints=conf.keypoints,
                nms_radius=conf.nms_radius,
                keypoint_threshold=conf.keypoint_threshold,
            ),
        )

    def _keypoints(self, taps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        desc, semi = taps["high"], taps["semi"]
        heat = keypoint_heatmap(semi)
        h, w = heat.shape[-2:]
        scores, idx = nms_topk(heat, self.conf.keypoints, self.conf.nms_radius, self.conf.keypoint_threshold)
        ys, xs = (idx // w).float(), (idx % w).float()
        return sample_descriptors(desc, xs, ys, (h, w)), scores, heat

    def local_features(self, taps):
        feats, scores, _ = self._keypoints(taps)
        # k-means only on real keypoints: zero-score slots are padding
        return {"high": feats[:, :, : max(1, int((scores > 0).sum(1).min()))]}

    def forward(self, taps):
        feats, scores, heat = self._keypoints(taps)
        out = self.vlad["high"](feats, scores.unsqueeze(1))
        cell = F.max_pool2d(heat, 8)
        return {
            "descriptor": out["vlad"],
            "attention": {"high": cell},
            "scores": out["mass"],
            "residuals": out["intra"],
            "level_descriptors": [out["vlad"]],
        }

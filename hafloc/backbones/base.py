"""The backbone interface: one forward pass -> feature maps at three levels."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

LEVELS = ("low", "mid", "high")


class Backbone(nn.Module):
    """Image batch (B,3,H,W) RGB in [0,1] -> ``{"low","mid","high"}`` feature maps.

    Subclasses set ``channels`` and ``strides`` (dicts by level) and normalise internally, so
    the exported ONNX graph and every caller share one normalisation that matches the weights.
    """

    name: str = "backbone"
    channels: dict[str, int]
    strides: dict[str, int]
    mean: torch.Tensor  # buffers (register_buffer): declared for the type checker
    std: torch.Tensor

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def load_pretrained(self, path: str | Path | None = None) -> None:
        """Load ImageNet (or the method's published) weights: ``path`` or the packaged ones."""
        raise NotImplementedError

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def trainable_groups(self) -> list[nn.Module]:
        """Stages from input to output; training unfreezes the last ``n`` of them."""
        raise NotImplementedError

    # A split pass: ``forward_from(forward_until(x, k), k)`` equals ``forward(x)`` for every
    # 0 <= k <= len(trainable_groups()). The training trunk cache stores the first half once.
    def forward_until(self, x: torch.Tensor, stop: int) -> dict[str, torch.Tensor]:
        """Run the first ``stop`` groups: the taps they complete, and under ``"carry"`` the map
        entering group ``stop`` (possibly the same tensor as a tap)."""
        raise NotImplementedError(f"{self.name} cannot split its forward pass")

    def forward_from(self, state: dict[str, torch.Tensor], stop: int) -> dict[str, torch.Tensor]:
        """Continue :meth:`forward_until`'s ``state`` through the groups from ``stop`` on: every tap."""
        raise NotImplementedError(f"{self.name} cannot split its forward pass")

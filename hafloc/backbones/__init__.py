"""Backbones: one registry, one ``create_backbone``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import HaflocError
from .base import LEVELS, Backbone
from .efficientnet_lite import EfficientNetLite
from .vgg16 import VGG16

BACKBONES: dict[str, Callable[[], Backbone]] = {
    "efficientnet-lite0": lambda: EfficientNetLite("efficientnet-lite0"),
    "efficientnet-lite1": lambda: EfficientNetLite("efficientnet-lite1"),
    "efficientnet-lite2": lambda: EfficientNetLite("efficientnet-lite2"),
    "vgg16": VGG16,
}


def create_backbone(name: str, weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
    """Build a backbone; ``pretrained`` loads ImageNet weights (``weights`` file or the packaged ones)."""
    if name not in BACKBONES:
        raise HaflocError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    net = BACKBONES[name]()
    if pretrained:
        net.load_pretrained(weights)
    return net


__all__ = ["LEVELS", "Backbone", "BACKBONES", "create_backbone"]

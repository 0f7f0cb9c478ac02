"""VGG16 (the paper's backbone) with taps conv3_3 / conv4_3 / conv5_3, torchvision state dict."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import HaflocError, InputError
from .base import Backbone

_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# index in torchvision's ``features`` of the ReLU after conv3_3, conv4_3, conv5_3
_TAPS = {"low": 15, "mid": 22, "high": 29}
_GROUP_ENDS = (16, 23, 30)  # layers run after each of trainable_groups()


class VGG16(Backbone):
    name = "vgg16"

    def __init__(self):
        super().__init__(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        layers: list[nn.Module] = []
        cin = 3
        for v in _CFG[:-1]:  # the last max-pool is never used
            if isinstance(v, str):  # "M"
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.channels = {"low": 256, "mid": 512, "high": 512}
        self.strides = {"low": 4, "mid": 8, "high": 16}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.normalize(x)
        taps = {i: level for level, i in _TAPS.items()}
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in taps:
                # clone: the next in-place ReLU would not touch it, but training code may
                out[taps[i]] = x
        return out

    def _run(self, x: torch.Tensor, start: int, end: int, out: dict[str, torch.Tensor]) -> torch.Tensor:
        taps = {i: level for level, i in _TAPS.items()}
        for i in range(start, end):
            x = self.features[i](x)
            if i in taps:
                out[taps[i]] = x
        return x

    def forward_until(self, x: torch.Tensor, stop: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if stop >= 1:
            x = self._run(self.normalize(x), 0, _GROUP_ENDS[min(stop, 3) - 1], out)
        out["carry"] = x
        return out

    def forward_from(self, state: dict[str, torch.Tensor], stop: int) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in state.items() if k != "carry"}
        x = state["carry"]
        start = _GROUP_ENDS[min(stop, 3) - 1] if stop >= 1 else 0
        self._run(x if stop >= 1 else self.normalize(x), start, len(self.features), out)
        return out

    def trainable_groups(self) -> list[nn.Module]:
        f = self.features
        return [f[:16], f[16:23], f[23:30]]

    def load_pretrained(self, path: str | Path | None = None) -> None:
        if path is None:
            raise HaflocError(
                "vgg16 needs ImageNet weights: pass --backbone-weights FILE, a torchvision-format "
                "state dict (e.g. vgg16-397923af.pth); hafloc never downloads weights"
            )
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "backbone weights file not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors, zip errors, weights_only refusals
            raise InputError(path, f"cannot load as a state dict ({type(err).__name__}: {err})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        feats = {k: v for k, v in state.items() if k.startswith("features.")}
        try:
            self.load_state_dict(feats)
        except RuntimeError as err:
            raise InputError(path, f"not a torchvision VGG16 state dict ({str(err).splitlines()[0]})") from None

"""The SuperPoint network (DeTone et al., CVPRW 2018), module names as the released checkpoint.

Its released weights are on no package registry: it starts random (trainable in our pipeline)
and loads the standard ``superpoint_v1.pth`` (keys conv1a..conv4b, convPa/convPb, convDa/convDb)
when a user supplies it with ``--backbone-weights``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .base import Backbone


class SuperPointNet(Backbone):
    """Gray VGG-style encoder (stride 8) + detector head (65 ch) + descriptor head (256 ch).

    ``forward`` returns ``{"high": unit descriptors (B,256,H/8,W/8), "semi": detector logits
    (B,65,H/8,W/8)}``; the superpoint head turns those into keypoints and one global VLAD.
    """

    gray: torch.Tensor  # buffer: RGB -> luminance weights

    name = "superpoint"

    def __init__(self):
        super().__init__(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        c1, c2, c3, c4, c5, d1 = 64, 64, 128, 128, 256, 256
        conv = lambda a, b, k=3: nn.Conv2d(a, b, k, stride=1, padding=k // 2)  # noqa: E731
        self.conv1a, self.conv1b = conv(1, c1), conv(c1, c1)
        self.conv2a, self.conv2b = conv(c1, c2), conv(c2, c2)
        self.conv3a, self.conv3b = conv(c2, c3), conv(c3, c3)
        self.conv4a, self.conv4b = conv(c3, c4), conv(c4, c4)
        self.convPa, self.convPb = conv(c4, c5), conv(c5, 65, 1)
        self.convDa, self.convDb = conv(c4, c5), conv(c5, d1, 1)
        self.channels = {"high": d1}
        self.strides = {"high": 8}
        gray = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        self.register_buffer("gray", gray, persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (x * self.gray).sum(dim=1, keepdim=True)
        for a, b in ((self.conv1a, self.conv1b), (self.conv2a, self.conv2b), (self.conv3a, self.conv3b)):
            x = F.max_pool2d(F.relu(b(F.relu(a(x)))), 2, 2)
        x = F.relu(self.conv4b(F.relu(self.conv4a(x))))
        semi = self.convPb(F.relu(self.convPa(x)))
        desc = F.normalize(self.convDb(F.relu(self.convDa(x))), p=2, dim=1)
        return {"high": desc, "semi": semi}

    def _stages(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Groups ``start`` .. ``stop - 1`` of the encoder (0: conv1-2, 1: conv3-4)."""
        if start <= 0 < stop:
            x = (x * self.gray).sum(dim=1, keepdim=True)
            for a, b in ((self.conv1a, self.conv1b), (self.conv2a, self.conv2b)):
                x = F.max_pool2d(F.relu(b(F.relu(a(x)))), 2, 2)
        if start <= 1 < stop:
            x = F.max_pool2d(F.relu(self.conv3b(F.relu(self.conv3a(x)))), 2, 2)
            x = F.relu(self.conv4b(F.relu(self.conv4a(x))))
        return x

    def _heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        semi = self.convPb(F.relu(self.convPa(x)))
        desc = F.normalize(self.convDb(F.relu(self.convDa(x))), p=2, dim=1)
        return {"high": desc, "semi": semi}

    def forward_until(self, x: torch.Tensor, stop: int) -> dict[str, torch.Tensor]:
        x = self._stages(x, 0, min(stop, 2))
        return {**(self._heads(x) if stop >= 3 else {}), "carry": x}

    def forward_from(self, state: dict[str, torch.Tensor], stop: int) -> dict[str, torch.Tensor]:
        if stop >= 3:
            return {k: v for k, v in state.items() if k != "carry"}
        return self._heads(self._stages(state["carry"], stop, 2))

    def trainable_groups(self) -> list[nn.Module]:
        return [
            nn.ModuleList([self.conv1a, self.conv1b, self.conv2a, self.conv2b]),
            nn.ModuleList([self.conv3a, self.conv3b, self.conv4a, self.conv4b]),
            nn.ModuleList([self.convPa, self.convPb, self.convDa, self.convDb]),
        ]

    def load_pretrained(self, path: str | Path | None = None) -> None:
        """Load the released checkpoint if given; otherwise keep the random init."""
        if path is None:
            return
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "SuperPoint weights file not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise InputError(path, f"cannot load as a state dict ({type(err).__name__}: {err})") from None
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            self.load_state_dict(state)
        except RuntimeError as err:
            raise InputError(path, f"not a SuperPoint state dict ({str(err).splitlines()[0]})") from None

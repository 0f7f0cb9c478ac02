"""Small ops written for the exported graph: same values as the plain torch call, fewer or faster
ONNX Runtime nodes (issue 14; benchmarks/profile_onnx.py). Each is the plain torch call outside
``torch.onnx.export``, so training and eager inference do not change."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _CeilAvgPool2(torch.autograd.Function):
    """``avg_pool2d(x, 2, ceil_mode=True)`` as an AveragePool ONNX Runtime runs on its fast path.

    ORT's AveragePool with ``ceil_mode=1`` takes a slow generic path (3-4x a plain pool at batch 1,
    10x at batch 8). Padding the bottom/right by one with padded cells excluded from the divisor
    (``count_include_pad=0``) gives the same windows and divisors for even and odd sizes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.avg_pool2d(x, 2, ceil_mode=True)

    @staticmethod
    def symbolic(g, x):  # noqa: D102
        return g.op(
            "AveragePool", x, kernel_shape_i=[2, 2], strides_i=[2, 2], pads_i=[0, 0, 1, 1], count_include_pad_i=0
        )


class _FlattenSpatial(torch.autograd.Function):
    """``x.flatten(2)`` as one Reshape to [0, 0, -1] (the tracer writes Shape, Slice, Concat, Reshape)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.flatten(2)

    @staticmethod
    def symbolic(g, x):  # noqa: D102
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor([0, 0, -1], dtype=torch.int64)))


class _ResizeLike(torch.autograd.Function):
    """Bilinear (half-pixel) resize of ``a`` to ``like``'s height and width, its size taken with two
    Shape slices (the tracer writes nine shape nodes for ``F.interpolate(size=...)``)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.interpolate(a, size=like.shape[-2:], mode="bilinear", align_corners=False)

    @staticmethod
    def symbolic(g, a, like):  # noqa: D102
        sizes = g.op("Concat", g.op("Shape", a, start_i=0, end_i=2), g.op("Shape", like, start_i=2, end_i=4), axis_i=0)
        empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
        return g.op(
            "Resize",
            a,
            empty,
            empty,
            sizes,
            mode_s="linear",
            coordinate_transformation_mode_s="half_pixel",
            nearest_mode_s="floor",
            cubic_coeff_a_f=-0.75,
        )


def ceil_avg_pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling, stride 2, ceil mode (a partial last row/column averages what it covers)."""
    return _CeilAvgPool2.apply(x) if torch.onnx.is_in_onnx_export() else F.avg_pool2d(x, 2, ceil_mode=True)


def flatten_spatial(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H*W)."""
    return _FlattenSpatial.apply(x) if torch.onnx.is_in_onnx_export() else x.flatten(2)


def resize_like(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of (B, C, h, w) ``a`` to ``like``'s spatial size."""
    if torch.onnx.is_in_onnx_export():
        return _ResizeLike.apply(a, like)
    return F.interpolate(a, size=like.shape[-2:], mode="bilinear", align_corners=False)

"""NetVLAD aggregation by matrix products.

The textbook formulation builds a (B, K, C, H, W) residual tensor; we never do. With soft
assignments A (B,K,N) (already multiplied by any attention) and L2-normalised features X (B,C,N):

    V[b,k] = sum_i A[b,k,i] (x_i - c_k) = (A X^T)[b,k] - (sum_i A[b,k,i]) c_k

so memory is O(B K (C + N)), independent of K x C x H x W. Internally the features are used
position-major, (B, N, C): the assignment softmax then runs over the last axis and both products
are plain (transposed-operand) MatMuls, which ONNX Runtime runs much faster than a channel-axis
softmax and an Einsum (benchmarks/profile_onnx.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def l2_normalize(x: torch.Tensor, dim: int, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, p=2, dim=dim)``, same arithmetic, but exported as a broadcasting Div: F.normalize
    expands the norm to x's full shape first, a copy of the whole map in the ONNX graph."""
    return x / torch.linalg.vector_norm(x, 2, dim=dim, keepdim=True).clamp_min(eps)


def vlad_residuals(
    features: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aggregate local features into per-cluster residual sums.

    Args:
        features: (B, N, C) local features, position-major.
        assign: (B, N, K) non-negative soft assignments (times attention, if any).
        centroids: (K, C).
    Returns:
        (residuals (B, K, C) un-normalised, mass (B, K) = sum_i assign).
    """
    mass = assign.sum(dim=1)
    residuals = torch.matmul(assign.transpose(1, 2), features) - mass.unsqueeze(2) * centroids.unsqueeze(0)
    return residuals, mass


def normalize_vlad(residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intra-normalise per cluster, then L2 the flattened vector. Returns (intra (B,K,C), flat (B,K*C))."""
    intra = l2_normalize(residuals, dim=2)
    flat = l2_normalize(intra.flatten(1), dim=1)
    return intra, flat


class NetVLAD(nn.Module):
    """Soft-assignment VLAD layer over (B, C, N) L2-normalised features.

    Assignment logits are ``alpha * <c_k / |c_k|, x>`` (NetVLAD's "v1" init): a 1x1 linear map
    initialised from k-means centroids, then trained freely.
    """

    def __init__(self, num_clusters: int, dim: int):
        super().__init__()
        self.num_clusters, self.dim = num_clusters, dim
        self.assign = nn.Linear(dim, num_clusters, bias=True)
        self.centroids = nn.Parameter(torch.rand(num_clusters, dim) * 0.1)
        nn.init.zeros_(self.assign.bias)

    @torch.no_grad()
    def init_from_kmeans(self, centroids: np.ndarray, sample: np.ndarray) -> float:
        """Set centroids and assignment sharpness from k-means on ``sample`` (N, C) features.

        alpha makes the mean gap between a feature's two closest (cosine) centroids a 100:1
        assignment ratio, as in NetVLAD. Returns alpha.
        """
        c = centroids.astype(np.float32)
        c_hat = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        dots = sample.astype(np.float32) @ c_hat.T  # (N, K)
        top2 = -np.sort(-dots, axis=1)[:, :2]
        gap = float(np.mean(top2[:, 0] - top2[:, 1]))
        alpha = -math.log(0.01) / max(gap, 1e-6)
        self.centroids.copy_(torch.from_numpy(c))
        self.assign.weight.copy_(torch.from_numpy(alpha * c_hat))
        self.assign.bias.zero_()
        return alpha

    def soft_assign(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, C) position-major -> (B, N, K) softmax over clusters."""
        return F.linear(features, self.assign.weight, self.assign.bias).softmax(dim=2)

    def forward(self, features: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(B, C, N) features, optional (B, 1, N) attention or (B, K, N) per-cluster weights.

        Returns ``vlad`` (B, K*C), ``intra`` (B, K, C), ``mass`` (B, K).
        """
        residuals, mass = self.aggregate(features, weights)
        intra, flat = normalize_vlad(residuals)
        return {"vlad": flat, "intra": intra, "mass": mass}

    def aggregate(
        self, features: torch.Tensor, weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, N) features, optional weights (as ``forward``) -> un-normalised residuals (B, K, C), mass (B, K)."""
        features = features.transpose(1, 2)  # a view; the graph folds it into the MatMuls
        assign = self.soft_assign(features)
        if weights is not None:
            assign = assign * weights.transpose(1, 2)
        return vlad_residuals(features, assign, self.centroids)

    def aggregate_projected(
        self,
        x: torch.Tensor,
        proj_weight: torch.Tensor,
        proj_bias: torch.Tensor,
        weights: torch.Tensor | None = None,
        eps: float = 1e-12,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``aggregate(l2_normalize(P x + p, dim=1), weights)`` for (B, Cin, N) ``x`` and a 1x1 projection
        (P (D, Cin) or (D, Cin, 1, 1), p (D,)), computed in x's space: cheaper when Cin < D.

        With x' = [x; 1], Q = [P p] (so y = P x + p = Q x') and n = |y| (clamped at eps), every use
        of y / n is linear in x' / n:

            n^2                 = x'^T (Q^T Q) x'
            logits              = (W Q) (x' / n) + b
            sum_i a_i y_i / n_i = Q sum_i a_i (x'_i / n_i)

        so the (B, D, N) projected map is never formed and the two big MatMuls shrink from D to
        Cin + 1 (41 instead of 128 on Lite0's stride-8 level; benchmarks/profile_onnx.py).
        """
        q = torch.cat([proj_weight.flatten(1), proj_bias.unsqueeze(1)], dim=1)  # (D, Cin + 1)
        xa = F.pad(x, (0, 0, 0, 1), value=1.0)  # (B, Cin + 1, N)
        n2 = (xa * torch.matmul(q.T @ q, xa)).sum(dim=1, keepdim=True)
        xh = xa / n2.clamp_min(eps * eps).sqrt()  # max(|y|, eps); n2 < 0 only by rounding
        # softmax over clusters, position-major (B, N, K): a softmax over the last axis
        assign = (torch.matmul(xh.transpose(1, 2), (self.assign.weight @ q).T) + self.assign.bias).softmax(dim=2)
        if weights is not None and weights.shape[1] == 1:
            # an attention map weighs positions: apply it to the (Cin + 1)-row features, not the K-column assignment
            mass = torch.matmul(weights, assign).flatten(1)
            xh = xh * weights
        else:
            if weights is not None:
                assign = assign * weights.transpose(1, 2)
            mass = assign.sum(dim=1)
        residuals = torch.matmul(torch.matmul(xh, assign).transpose(1, 2), q.T) - mass.unsqueeze(2) * self.centroids
        return residuals, mass

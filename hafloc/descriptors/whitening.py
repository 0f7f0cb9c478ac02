"""PCA whitening of global descriptors (learned, as in NetVLAD / Jegou & Chum 2012)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HaflocError


def fit_pca_whitening(x: np.ndarray, dim: int, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """PCA whitening on rows of ``x`` (N, D): returns (mean (D,), projection (dim, D)).

    y = P (x - mean) has identity covariance on the training rows. ``dim`` must not exceed
    N - 1 (the rank of N centred rows): asking for more would whiten pure noise.
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if dim > min(n - 1, d):
        raise HaflocError(
            f"whitening to {dim} dimensions needs more than {dim} descriptors (got {n}) "
            f"and at most the descriptor size ({d}); use a smaller --dim or more images"
        )
    mean = x.mean(axis=0)
    xc = x - mean
    # economy SVD of the (N, D) data: cheap when N << D, which is the usual case for VLAD
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    sigma = s[:dim] / np.sqrt(max(n - 1, 1))
    proj = vt[:dim] / (sigma[:, None] + eps)
    return mean.astype(np.float32), proj.astype(np.float32)


class Whitening(nn.Module):
    """y = normalize(P (x - m)); identity until fitted (``dim`` None)."""

    # buffers (register_buffer): declared for the type checker
    mean: torch.Tensor
    proj: torch.Tensor
    fitted: torch.Tensor

    def __init__(self, in_dim: int, dim: int | None):
        super().__init__()
        self.dim = dim
        self.register_buffer("mean", torch.zeros(in_dim if dim else 0))
        self.register_buffer("proj", torch.zeros((dim, in_dim) if dim else (0, 0)))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def set(self, mean: np.ndarray, proj: np.ndarray) -> None:
        self.mean = torch.from_numpy(mean)
        self.proj = torch.from_numpy(proj)
        self.dim = proj.shape[0]
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dim:
            return x
        return F.normalize((x - self.mean) @ self.proj.t(), p=2, dim=1)

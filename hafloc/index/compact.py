"""The index's own compact representation: PCA-whitening to a chosen size and float16 storage.

A model's descriptor can be large (HAF: 24,576-D, ~98 KB of float32 per image). An index may
store a PCA-whitened projection of it instead (fitted on a sample of the database when the index
is first built, with ``hafloc.descriptors.whitening.fit_pca_whitening``), and/or store its
descriptors as float16. Both are recorded in ``index.json`` (``dim``, ``dtype``, ``projection``),
and queries go through the same projection (``IndexStore.project``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hafloc.errors import InputError, ModelMismatchError
from hafloc.fileio import atomic_path

DTYPES = ("float32", "float16")
PROJECTION_FILE = "projection.npz"
COMPACT_THRESHOLD = 100_000  # images above which `index build` picks the compact representation
COMPACT_BUDGET = 8 << 30  # ... or float32 descriptor bytes above which it does
COMPACT_DIM, COMPACT_DTYPE = 256, "float16"  # what it picks (the paper's Table 1 size)
MAX_FIT_BYTES = 2 << 30  # float32 sample held for the fit


def fit_sample_size(input_dim: int, dim: int) -> int:
    """How many database descriptors the projection is fitted on: 8 per output dimension (at
    least 2,000), within ~2 GB of float32."""
    return max(dim + 1, min(max(8 * dim, 2000), MAX_FIT_BYTES // (4 * input_dim)))


@dataclass
class Projection:
    """y = normalize(P (x - mean)): PCA-whitening from ``input_dim`` to ``dim``."""

    mean: np.ndarray  # (input_dim,)
    proj: np.ndarray  # (dim, input_dim)

    @property
    def input_dim(self) -> int:
        return int(self.proj.shape[1])

    @property
    def dim(self) -> int:
        return int(self.proj.shape[0])

    @classmethod
    def fit(cls, x: np.ndarray, dim: int) -> "Projection":
        from hafloc.descriptors.whitening import fit_pca_whitening

        mean, proj = fit_pca_whitening(x, dim)
        return cls(mean, proj)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = (np.asarray(x, np.float32) - self.mean) @ self.proj.T
        return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, mean=self.mean, proj=self.proj)

    @classmethod
    def load(cls, path: Path, expect: dict[str, Any]) -> "Projection":
        try:
            with np.load(path, allow_pickle=False) as z:
                p = cls(z["mean"].astype(np.float32), z["proj"].astype(np.float32))
        except (OSError, KeyError, ValueError) as err:
            raise InputError(path, f"index projection unreadable ({err}); the index is damaged") from None
        if (p.input_dim, p.dim) != (expect["input_dim"], expect["dim"]) or p.mean.shape != (p.input_dim,):
            raise InputError(
                path,
                f"projection is {p.input_dim} -> {p.dim}, index.json says "
                f"{expect['input_dim']} -> {expect['dim']}; the index is damaged",
            )
        return p


def check_compact(info: dict[str, Any], where: Path) -> None:
    """``dtype`` and ``projection`` fields of index.json (InputError naming the file)."""
    dtype = info.get("dtype", "float32")
    if dtype not in DTYPES:
        raise InputError(where, f"field 'dtype' must be one of {DTYPES} ({dtype!r})")
    p = info.get("projection")
    if p is None:
        return
    ok = isinstance(p, dict) and all(
        isinstance(p.get(k), int) and not isinstance(p.get(k), bool) and p[k] > 0 for k in ("input_dim", "dim")
    )
    if not ok or p["dim"] != info.get("dim") or p["dim"] >= p["input_dim"]:
        raise InputError(where, f"field 'projection' is invalid ({p!r})")


def mismatch(folder: Path, got: int, input_dim: int, dim: int) -> ModelMismatchError:
    space = f"{input_dim}-D (projected to {dim}-D)" if input_dim != dim else f"{dim}-D"
    return ModelMismatchError(
        f"{folder}: query descriptors are {got}-D, the index takes {space} descriptors; "
        "use the model the index was built with"
    )

"""Fitting a fresh model to images: PCA-initialised projections, k-means clusters (with
NetVLAD's assignment sharpness), and optional PCA whitening of the global descriptor."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import faiss
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import HaflocError
from ..heads.multilevel import MultiLevelVLAD
from ..heads.vlad import NetVLAD
from ..images.io import load_image, to_tensor
from .extract import Extractor
from .network import GeoLocNet
from .runtime import Skipped, TorchRunner, run_batches
from .whitening import fit_pca_whitening

log = logging.getLogger(__name__)


def _iter_taps(model: GeoLocNet, paths: list[Path], max_side: int, progress: bool, desc: str):
    """The backbone's taps of each readable image, one image at a time and in order (the column
    sampling draws from one random stream, so the order fixes the result)."""

    def load(p: Path) -> torch.Tensor:
        return to_tensor(load_image(p), max_side=max_side)

    runner = TorchRunner(model, outputs=("taps",))
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for ev in run_batches(runner, paths, load, batch_size=1):
            bar.update(1)
            if isinstance(ev, Skipped):
                log.warning("skipped %s", ev.error)
                continue
            yield ev.outputs["taps"]


def _sample_columns(feats: torch.Tensor, n: int, rng: np.random.Generator) -> np.ndarray:
    """(1, C, N) -> (min(n, N), C) random columns."""
    f = feats[0].numpy().T
    if len(f) > n:
        f = f[rng.choice(len(f), n, replace=False)]
    return f


def fit_clusters(
    model: GeoLocNet,
    paths: list[Path],
    samples_per_image: int = 100,
    seed: int = 0,
    max_side: int | None = None,
    progress: bool = True,
    projections: bool = True,
) -> dict:
    """Initialise projections (PCA) and VLAD clusters (k-means) of ``model.head`` from ``paths``;
    ``projections=False`` keeps the (trained) projections and re-fits the clusters in their space:
    adapting a trained model to a collection."""
    model.eval()
    taps = _iter_taps(model, paths, max_side or model.config.max_side, progress, "fit: features")
    return fit_clusters_from_taps(model, taps, samples_per_image, seed, projections)


def fit_clusters_from_taps(
    model: GeoLocNet,
    taps: Iterable[dict[str, torch.Tensor]],
    samples_per_image: int = 100,
    seed: int = 0,
    projections: bool = True,
) -> dict:
    """:func:`fit_clusters` on backbone taps already computed (one image each, in order)."""
    head = model.head
    if not isinstance(head, MultiLevelVLAD):  # the heads with clusters (uses_clusters); taps left unread
        return {}
    rng = np.random.default_rng(seed)
    has_proj = len(head.proj) > 0 and projections
    # Keep only sampled columns, never whole maps: memory stays small for many images.
    samples: dict[str, list[np.ndarray]] = {lv: [] for lv in head.levels}
    n_images = 0
    for t in taps:
        with torch.inference_mode():
            feats = head.raw_features(t) if has_proj else head.local_features(t)
        for lv in head.levels:
            samples[lv].append(_sample_columns(feats[lv], samples_per_image, rng))
        n_images += 1
    if not n_images:
        raise HaflocError("none of the images given for fitting could be read")
    info: dict = {"images": n_images, "levels": {}}
    for lv in head.levels:
        x = np.concatenate(samples[lv]).astype(np.float32)
        if has_proj:
            mean = x.mean(axis=0)
            _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
            d_out = cast(nn.Conv2d, head.proj[lv]).out_channels
            comps = np.zeros((d_out, x.shape[1]), np.float32)
            k = min(d_out, vt.shape[0])
            comps[:k] = vt[:k]  # fewer input channels than outputs: the rest start at zero
            head.set_projection(lv, comps, mean)
            x = (x - mean) @ comps.T  # the 1x1 projection applied to the sampled columns
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        x = np.ascontiguousarray(x, dtype=np.float32)
        vlad = cast(NetVLAD, head.vlad[lv])
        k = vlad.num_clusters
        if len(x) < k:
            raise HaflocError(f"only {len(x)} local features for {k} clusters: give more images")
        km = faiss.Kmeans(x.shape[1], k, niter=30, seed=seed, verbose=False, max_points_per_centroid=1000)
        km.train(x)
        assert km.centroids is not None  # set by train(); faiss's stubs keep it optional
        alpha = vlad.init_from_kmeans(km.centroids, x)
        info["levels"][lv] = {"features": len(x), "clusters": k, "alpha": round(alpha, 3)}
    return info


def fit_whitening(
    model: GeoLocNet,
    paths: list[Path],
    dim: int,
    max_images: int = 10_000,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 8,
) -> dict:
    """Fit PCA whitening to ``dim`` on pre-whitening descriptors of (at most ``max_images``) images."""
    rng = np.random.default_rng(seed)
    if len(paths) > max_images:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), max_images, replace=False))]
    model.whitening.dim, saved = None, model.whitening.dim  # extract raw descriptors
    try:
        res = Extractor(model, batch_size=batch_size).extract_paths(paths, progress=progress)
    finally:
        model.whitening.dim = saved
    mean, proj = fit_pca_whitening(res.descriptors, dim)
    model.whitening.set(mean, proj)
    model.config.whiten_dim = dim
    return {"images": len(res.names), "dim": dim}

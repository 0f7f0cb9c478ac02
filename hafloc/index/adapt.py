"""Adapting a trained model to the collection it indexes (``hafloc index build``, ``Index.build``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ADAPTED_NAME = "adapted.model"  # a trained model adapted to the indexed photos, inside the index folder
# k-means of 64 clusters wants >= 39 features each (faiss): 2,496, which 18 photos give at the 140
# columns of a 4:3 photo's coarsest map at 448 px (13 square ones). How many photos the fit sees
# changes little from 10 on (benchmarks/adapt_size.py); fewer would leave k-means short of features.
ADAPT_MIN_IMAGES = 18
ADAPT_MAX_IMAGES = 300
ADAPT_FEATURES_PER_CLUSTER = 39


def adapt_samples_per_image(n_images: int, model: Any, base: int = 100) -> int:
    """Local features to sample per photo so that k-means gets ``ADAPT_FEATURES_PER_CLUSTER`` per
    cluster from ``n_images`` photos (``base`` at least; a photo gives at most as many as its map has)."""
    k = max((vlad.num_clusters for vlad in getattr(model.head, "vlad", {}).values()), default=0)
    return max(base, -(-ADAPT_FEATURES_PER_CLUSTER * k // max(n_images, 1)))


def adapt_model(model: Any, files: list[Path], folder: str | Path, seed: int = 0, progress: bool = False) -> Any:
    """``model`` adapted to the collection it is about to index: a *trained* VLAD model gets its
    clusters re-fitted by k-means on (at most 300 of) ``files``, its trained projections, attention
    and fusion weights kept (benchmarks/real_training.py: never below the model as trained on the
    shared real sets but one; benchmarks/adapt_size.py: it costs 1-3 R@1 on the training streets
    themselves and gains away from them, at any size). Saved once as ``FOLDER/adapted.model`` (a
    rerun or a second build at the same time reuses it: one fit, under a lock). Untrained models
    (their clusters come from ``model init`` on photos the user chose), heads without clusters and
    collections under ``ADAPT_MIN_IMAGES`` photos come back unchanged."""
    import numpy as np

    from ..descriptors.fit import fit_clusters
    from ..descriptors.modelfile import load_model, read_model_file, recorded_path, save_model
    from ..fileio import os_lock

    if not model.meta.get("trained") or not getattr(model.head, "uses_clusters", False):
        return model
    if len(files) < ADAPT_MIN_IMAGES or not model.source_path:
        return model
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ADAPTED_NAME
    with os_lock(str(path) + ".lock"):
        if not path.is_file():
            rng = np.random.default_rng(seed)
            pick = sorted(rng.choice(len(files), min(ADAPT_MAX_IMAGES, len(files)), replace=False).tolist())
            adapted = load_model(model.source_path)
            spi = adapt_samples_per_image(len(pick), adapted)
            info = fit_clusters(adapted, [files[i] for i in pick], spi, seed=seed, progress=progress, projections=False)
            trunk = "pretrained" if read_model_file(model.source_path).get("trunk") else "included"
            meta = {**adapted.meta, "adapted": {"from": recorded_path(model), "images": len(pick), "fit": info}}
            save_model(adapted, path, meta=meta, trunk=trunk)
    return load_model(path)

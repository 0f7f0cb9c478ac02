"""Fill an index folder from a folder of photos and calibrate it: the jobs behind ``hafloc index
build`` / ``index add`` / ``index calibrate`` and the public ``hafloc.Index.build`` / ``Index.add``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import HaflocError
from ..images.io import list_images
from .calibrate import MIN_POSITIONED, Calibrator, calibrate_index, summary_line
from .positions import read_positions_csv
from .store import AddReport, ExtractFn, IndexStore, extractor_fn

LOCAL_DEFAULTS = {"max_keypoints": 1024, "max_side": 640}  # ``index build --local``'s defaults
ADAPTED_NAME = "adapted.model"  # a trained model adapted to the indexed photos, inside the index folder
# k-means of 64 clusters wants >= 39 features each: 25 photos at 100 sampled features per photo
ADAPT_MIN_IMAGES = 25
ADAPT_MAX_IMAGES = 300


def adapt_model(model: Any, files: list[Path], folder: str | Path, seed: int = 0, progress: bool = False) -> Any:
    """``model`` adapted to the collection it is about to index: a *trained* VLAD model gets its
    clusters re-fitted by k-means on (at most 300 of) ``files``, its trained projections,
    attention and fusion weights kept (benchmarks/real_training.py: never below the model as
    trained on the shared real sets but one). Saved once as ``FOLDER/adapted.model`` (a rerun or a
    second build at the same time reuses it: one fit, under a lock). Untrained models (their
    clusters come from ``model init`` on photos the user chose), heads without clusters and
    collections under ``ADAPT_MIN_IMAGES`` photos come back unchanged."""
    import filelock
    import numpy as np

    from ..descriptors.fit import fit_clusters
    from ..descriptors.modelfile import load_model, read_model_file, recorded_path, save_model

    if not model.meta.get("trained") or not getattr(model.head, "uses_clusters", False):
        return model
    if len(files) < ADAPT_MIN_IMAGES or not model.source_path:
        return model
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ADAPTED_NAME
    with filelock.FileLock(str(path) + ".lock"):
        if not path.is_file():
            rng = np.random.default_rng(seed)
            pick = sorted(rng.choice(len(files), min(ADAPT_MAX_IMAGES, len(files)), replace=False).tolist())
            adapted = load_model(model.source_path)
            info = fit_clusters(adapted, [files[i] for i in pick], seed=seed, progress=progress, projections=False)
            trunk = "pretrained" if read_model_file(model.source_path).get("trunk") else "included"
            meta = {**adapted.meta, "adapted": {"from": recorded_path(model), "images": len(pick), "fit": info}}
            save_model(adapted, path, meta=meta, trunk=trunk)
    return load_model(path)


def local_spec(local: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """The store's ``local`` setting from an extractor name (default settings) or a
    ``{"extractor", "conf"}`` dict; None stores no local features."""
    from ..local import EXTRACTORS

    if local is None:
        return None
    spec = {"extractor": local, "conf": dict(LOCAL_DEFAULTS)} if isinstance(local, str) else dict(local)
    if spec.get("extractor") not in EXTRACTORS:
        raise HaflocError(f"local: unknown extractor {spec.get('extractor')!r}; choose from {', '.join(EXTRACTORS)}")
    return spec


def local_extractor(store: IndexStore) -> Any:
    """The extractor of the local features the index stores (None when it stores none)."""
    if not store.local_config:
        return None
    from ..local import create_extractor

    return create_extractor(store.local_config["extractor"], **store.local_config.get("conf", {}))


def add_folder(
    store: IndexStore,
    folder: str | Path,
    describe: Any,
    positions: str | Path | dict[str, tuple[float, float]] | None = None,
    chunk_size: int = 64,
    progress: bool = False,
) -> AddReport:
    """Index the photos of ``folder`` (recursively) not yet in ``store``.

    ``describe``: an ``Extractor`` (local features are added as the index stores them) or a store
    ``ExtractFn``; ``positions``: a positions CSV (image,lat,lon) or ``{image: (lat, lon)}``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HaflocError(f"{folder}: not a folder")
    if isinstance(positions, (str, Path)):
        positions = read_positions_csv(positions)
    files = [p for p, _ in list_images([folder])]
    if not files:
        raise HaflocError(f"{folder}: no images found")
    extract: ExtractFn = describe if callable(describe) else extractor_fn(describe, local_extractor(store))
    # relative to the folder: the store resolves them against the root it records
    return store.add(
        [p.relative_to(folder) for p in files],
        folder,
        extract,
        positions=positions,
        chunk_size=chunk_size,
        progress=progress,
    )


def calibrate_store(store: IndexStore, max_samples: int | None = None, **kw: Any) -> Calibrator:
    """Calibrate ``store``'s confidences; an index with local features re-ranks (and first fits its rule)."""
    from .rerank import RERANK_CALIBRATION_SAMPLES, calibrate_reranked

    if store.local_config:
        return calibrate_reranked(store, max_samples=max_samples or RERANK_CALIBRATION_SAMPLES, **kw)
    return calibrate_index(store, max_samples=max_samples or 5000, **kw)


def auto_calibrate(store: IndexStore, progress: bool = False) -> tuple[Calibrator | None, str]:
    """End of a build: (the calibration, its summary line), or (None, why not: too few positioned
    photos or answers), never an error."""
    positioned = int(store.info.get("counts", {}).get("positioned", 0))
    if positioned < MIN_POSITIONED:
        return (
            None,
            f"not calibrated ({positioned} positioned photos, {MIN_POSITIONED} needed); confidences are heuristic",
        )
    try:
        cal = calibrate_store(store, progress=progress)
    except HaflocError as err:
        return None, f"not calibrated ({err}); confidences are heuristic"
    return cal, summary_line(cal)

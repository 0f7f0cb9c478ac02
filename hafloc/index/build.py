"""Fill an index folder from a folder of photos and calibrate it: the jobs behind ``hafloc index
build`` / ``index add`` / ``index calibrate`` and the public ``hafloc.Index.build`` / ``Index.add``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import HaflocError, InputError
from ..images.io import list_images
from .calibrate import (
    MIN_POSITIONED,
    Calibrator,
    calibrate_index,
    calibration_path,
    load_calibrator,
    summary_line,
)
from .positions import read_positions_csv
from .store import AddReport, ExtractFn, IndexStore, extractor_fn

log = logging.getLogger(__name__)

LOCAL_DEFAULTS = {"max_keypoints": 1024, "max_side": 640}  # ``index build --local``'s defaults
# ``--local auto``: the shipped pipeline verifies with xfeat + MNN, what its learned scorer was
# fitted on (BENCHMARKS.md "Re-ranking": never below global answers, +7 R@1 on SF night, +7 on
# the tower floors), so an index of the default model stores xfeat features unless told not to.
LOCAL_AUTO = "auto"
DEFAULT_LOCAL = "xfeat"


def local_spec(
    local: str | dict[str, Any] | None, default_model: bool = False, new_index: bool = True
) -> dict[str, Any] | None:
    """The store's ``local`` setting from an extractor name (default settings) or a
    ``{"extractor", "conf"}`` dict; None or ``"none"`` stores no local features. ``"auto"``:
    ``DEFAULT_LOCAL`` for a new index of the shipped default model, else none (an existing index
    keeps what it stores)."""
    from ..local import EXTRACTORS

    if local == LOCAL_AUTO:
        local = DEFAULT_LOCAL if default_model and new_index else None
    if local is None or local == "none":
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


def probe_descriptors(store: IndexStore) -> Any:
    """The index model's descriptors of ``calibrate.probe_images`` (blank and noise frames: the
    unrelated-photo gate), or None with a warning when the model cannot be loaded (no gate then)."""
    from ..descriptors.extract import Extractor
    from .calibrate import describe_probes
    from .locator import open_model_for

    try:
        extractor = Extractor(open_model_for(store), backend="torch")
    except HaflocError as err:
        log.warning("no unrelated-photo gate (%s)", err)
        return None
    return describe_probes(extractor)


def calibrate_store(store: IndexStore, max_samples: int | None = None, **kw: Any) -> Calibrator:
    """Calibrate ``store``'s confidences; an index with local features re-ranks (and first fits its rule)."""
    from .rerank import RERANK_CALIBRATION_SAMPLES, calibrate_reranked

    if "probes" not in kw:
        kw["probes"] = probe_descriptors(store)
    if store.local_config:
        return calibrate_reranked(store, max_samples=max_samples or RERANK_CALIBRATION_SAMPLES, **kw)
    return calibrate_index(store, max_samples=max_samples or 5000, **kw)


def auto_calibrate(store: IndexStore, progress: bool = False) -> tuple[Calibrator | None, str]:
    """End of a build: (the calibration, its summary line), or (None, why not: too few positioned
    photos or answers), never an error. A calibration fitted on the index's present photos is kept
    as it is (a rerun that adds nothing must not report the index uncalibrated, nor replace a
    calibration fitted with other settings); one fitted before photos were added is refitted when
    the index has enough positioned photos, else kept and said to be older."""
    try:
        current = load_calibrator(store)
    except InputError:  # a damaged calibration.json: refitted below, or the build says it is uncalibrated
        current = None
    if current is not None and current.meta.get("index_images") == len(store):
        return current, f"{summary_line(current)}; kept (no photo added since)"
    positioned = int(store.info.get("counts", {}).get("positioned", 0))
    if positioned < MIN_POSITIONED:
        if current is not None:
            return current, (
                f"{summary_line(current)}; kept, fitted when the index held {current.meta.get('index_images')} "
                f"photos ({positioned} positioned now, {MIN_POSITIONED} needed to refit automatically; "
                "'hafloc index calibrate' refits it)"
            )
        return (
            None,
            f"not calibrated ({positioned} positioned photos, {MIN_POSITIONED} needed); confidences are heuristic",
        )
    try:
        cal = calibrate_store(store, progress=progress)
    except HaflocError as err:
        if current is not None and calibration_path(store.folder).is_file():  # a refused refit leaves it
            return current, f"{summary_line(current)}; kept, the refit failed ({err})"
        return None, f"not calibrated ({err}); confidences are heuristic"
    return cal, summary_line(cal)

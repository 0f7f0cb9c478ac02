"""One index plus the model that built it: locate image files or decoded photos.

Shared by ``hafloc locate``, ``hafloc index export-hloc`` and the web server, so all of them
load the model the same way and refuse a model other than the index's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..descriptors.extract import Extractor
from ..descriptors.modelfile import load_model
from ..errors import HaflocError, InputError
from ..index.calibrate import load_calibrator
from ..index.locate import answer
from ..index.store import IndexStore, Match


@dataclass
class LocatorConfig:
    """How queries are described: see ``hafloc.descriptors.extract.Extractor``."""

    backend: str = "auto"
    batch_size: int = 8
    max_side: int | None = None
    num_threads: int | None = None
    agree_m: float | None = None  # None: the calibration's radius (25 m without one)
    min_confidence: float | None = None  # below it the answer is "unknown"


def open_model_for(store: IndexStore, model_path: str | Path | None = None):
    """The index's model (its stored path, or ``model_path``), refused when its fingerprint differs."""
    if model_path is None:
        stored = store.info.get("model_path")
        if not stored:
            raise HaflocError(f"{store.folder}: the index does not record its model; pass --model")
        if not Path(stored).is_file():
            raise InputError(stored, "model file of the index not found (moved?); pass --model")
        model_path = stored
    model = load_model(model_path)
    store.check_model(model.fingerprint(), model_path)
    return model


class Locator:
    """An open index, its model and an extractor; thread-safe for concurrent ``locate_image`` calls."""

    def __init__(self, index: str | Path, model_path: str | Path | None = None,
                 config: LocatorConfig | None = None):
        self.config = config or LocatorConfig()
        self.store = IndexStore.open(index)
        self.model = open_model_for(self.store, model_path)
        c = self.config
        self.calibrator = load_calibrator(self.store)
        self.warnings: list[str] = []
        if self.calibrator is not None and c.agree_m is not None and c.agree_m != self.calibrator.agree_m:
            self.warnings.append(f"{self.store.folder}: calibrated for {self.calibrator.agree_m:g} m, not "
                                 f"{c.agree_m:g} m; confidences are uncalibrated")
            self.calibrator = None
        self.agree_m = c.agree_m if c.agree_m is not None else (
            self.calibrator.agree_m if self.calibrator is not None else 25.0)
        self.extractor = Extractor(self.model, batch_size=c.batch_size, max_side=c.max_side, backend=c.backend,
                                   num_threads=c.num_threads)

    def close(self) -> None:
        self.store.close()

    def results(self, descs: np.ndarray, names: Sequence[str], k: int) -> list[dict[str, Any]]:
        """``result_json`` per query, each match also carrying its database ``id`` (for thumbnails)."""
        descs = np.atleast_2d(np.asarray(descs, dtype=np.float32))
        if len(names) == 0:
            return []
        depth = max(k, self.calibrator.k) if self.calibrator is not None else k
        all_matches: list[list[Match]] = self.store.search(descs, depth)  # type: ignore[assignment]
        out = []
        for name, ms in zip(names, all_matches):
            res = answer(name, ms, k, self.agree_m, self.calibrator, self.config.min_confidence)
            for m_json, m in zip(res["matches"], ms):  # answer keeps the order of the matches
                m_json["id"] = m.id
            out.append(res)
        return out

    def locate_paths(self, paths: Sequence[Path], names: Sequence[str], k: int = 10,
                     progress: bool = True) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Locate files in batches: (results in input order, failures [(name, reason)])."""
        res = self.extractor.extract_paths(list(paths), names=list(names), progress=progress)
        return self.results(res.descriptors, res.names, k), res.failures

    def locate_image(self, img: Image.Image, name: str, k: int = 10) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Locate one decoded photo: (result, attention maps {level: (h, w)})."""
        out = self.extractor.describe_image(img)
        return self.results(out["descriptor"][None], [name], k)[0], out["attention"]

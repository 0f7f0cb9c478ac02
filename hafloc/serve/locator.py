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
from ..index.rerank import FusionRule, Reranker, Verified, rerank_matches
from ..index.store import IndexStore, Match

DEFAULT_RERANK = 10  # candidates verified per query when the index has local features


@dataclass
class LocatorConfig:
    """How queries are described: see ``hafloc.descriptors.extract.Extractor``."""

    backend: str = "auto"
    batch_size: int = 8
    max_side: int | None = None
    num_threads: int | None = None
    agree_m: float | None = None  # None: the calibration's radius (25 m without one)
    min_confidence: float | None = None  # below it the answer is "unknown"
    rerank: int | None = None  # candidates verified by local matches (None: DEFAULT_RERANK if the index has them)


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

    def __init__(
        self,
        index: str | Path,
        model_path: str | Path | None = None,
        config: LocatorConfig | None = None,
        read_only: bool = False,
    ):
        """``read_only``: servers: never take the index's write lock (``IndexStore.open``)."""
        self.config = config or LocatorConfig()
        self.store = IndexStore.open(index, read_only=read_only)
        self.model = open_model_for(self.store, model_path)
        c = self.config
        self.calibrator = load_calibrator(self.store)
        self.warnings: list[str] = []
        if self.calibrator is not None and c.agree_m is not None and c.agree_m != self.calibrator.agree_m:
            self.warnings.append(
                f"{self.store.folder}: calibrated for {self.calibrator.agree_m:g} m, not "
                f"{c.agree_m:g} m; confidences are uncalibrated"
            )
            self.calibrator = None
        self.agree_m = (
            c.agree_m if c.agree_m is not None else (self.calibrator.agree_m if self.calibrator is not None else 25.0)
        )
        self.extractor = Extractor(
            self.model, batch_size=c.batch_size, max_side=c.max_side, backend=c.backend, num_threads=c.num_threads
        )
        local = self.store.local_config
        if c.rerank is not None and c.rerank < 0:
            raise HaflocError(f"--rerank must be 0 or more, got {c.rerank}")
        self.rerank_k = (DEFAULT_RERANK if local else 0) if c.rerank is None else c.rerank
        self.reranker: Reranker | None = None
        if self.rerank_k and not local:
            raise HaflocError(
                f"{self.store.folder}: re-ranking needs local features in the index "
                "(build it with 'hafloc index build ... --local xfeat'), or pass --rerank 0"
            )
        if self.rerank_k and local:
            self.reranker = Reranker(
                local["extractor"], local.get("conf"), rule=FusionRule.from_dict(self.store.info.get("rerank"))
            )

    def close(self) -> None:
        self.store.close()

    def results(
        self,
        descs: np.ndarray,
        names: Sequence[str],
        k: int,
        local: Sequence[Any] | None = None,
        correspondences: bool = False,
    ) -> list[dict[str, Any]]:
        """``result_json`` per query, each match also carrying its database ``id`` (for thumbnails).

        ``local``: the queries' local features (one per name) to re-rank the top ``rerank_k`` by
        verified matches; ``correspondences``: the best match also carries its inlier pairs.
        """
        descs = np.atleast_2d(np.asarray(descs, dtype=np.float32))
        if len(names) == 0:
            return []
        rerank = self.rerank_k if self.reranker is not None and local is not None else 0
        depth = max(k, rerank, self.calibrator.k if self.calibrator is not None else 0)
        all_matches: list[list[Match]] = self.store.search(descs, depth)  # type: ignore[assignment]
        out = []
        for i, (name, ms) in enumerate(zip(names, all_matches)):
            checked: dict[int, Verified] = {}
            feats: dict[int, Any] = {}
            if rerank:
                assert self.reranker is not None and local is not None
                top = ms[:rerank]
                feats = self.store.local_features([m.id for m in top])
                verified = self.reranker.verify(local[i], [feats.get(m.id) for m in top])
                checked = {m.id: v for m, v in zip(top, verified)}
                ms = rerank_matches(ms, verified, self.reranker.rule)
            min_inliers = self.reranker.rule if rerank and self.reranker else None  # its is_verified decides
            res = answer(name, ms, k, self.agree_m, self.calibrator, self.config.min_confidence, min_inliers)
            ms = ms[:k]
            for m_json, m in zip(res["matches"], ms):  # answer keeps the order of the matches
                m_json["id"] = m.id
            if correspondences and ms and ms[0].id in checked:
                v = checked[ms[0].id]
                assert local is not None
                res["matches"][0]["correspondences"] = {
                    "query": np.round(v.points_query, 1).tolist(),
                    "db": np.round(v.points_db, 1).tolist(),
                    "query_size": list(local[i].image_size),
                    "db_size": list(feats[ms[0].id].image_size),
                }
            out.append(res)
        return out

    def locate_paths(
        self, paths: Sequence[Path], names: Sequence[str], k: int = 10, progress: bool = True
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Locate files in batches: (results in input order, failures [(name, reason)])."""
        res = self.extractor.extract_paths(list(paths), names=list(names), progress=progress)
        local = None
        if self.reranker is not None:
            by_name = dict(zip(names, paths))
            local = [self.reranker.features(self.extractor.load(by_name[n])) for n in res.names]
        return self.results(res.descriptors, res.names, k, local), res.failures

    def locate_image(
        self, img: Image.Image, name: str, k: int = 10, correspondences: bool = False
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Locate one decoded photo: (result, attention maps {level: (h, w)})."""
        out = self.extractor.describe_image(img)
        local = [self.reranker.features(img)] if self.reranker is not None else None
        res = self.results(out["descriptor"][None], [name], k, local, correspondences=correspondences)[0]
        return res, out["attention"]

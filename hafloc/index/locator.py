"""One index plus the model that built it: locate image files or decoded photos.

Shared by ``hafloc locate``, ``hafloc index export-hloc`` and the web server, so all of them
load the model the same way and refuse a model other than the index's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..descriptors.extract import Extractor
from ..descriptors.modelfile import DEFAULT, load_model
from ..descriptors.network import GeoLocNet
from ..errors import HaflocError, InputError, ModelMismatchError
from .adapt import ADAPTED_NAME
from .calibrate import describe_probes, load_calibrator, unrelated_similarity
from .locate import answer
from .prior import Near
from .rerank import FusionRule, Reranker, Verified, rerank_matches
from .store import IndexStore, Match

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


def open_model_for(store: IndexStore, model_path: str | Path | GeoLocNet | None = None) -> GeoLocNet:
    """The index's model (its stored path, or ``model_path``: a file or a loaded model), refused when
    its fingerprint differs."""
    if isinstance(model_path, GeoLocNet):
        store.check_model(model_path.fingerprint(), model_path.source_path)
        return model_path
    if model_path is None:
        stored = store.info.get("model_path")
        if not stored:
            raise HaflocError(f"{store.folder}: the index does not record its model; pass --model")
        inside = store.folder / ADAPTED_NAME  # the index's adapted model moves with its folder
        if Path(stored).name == ADAPTED_NAME and not Path(stored).is_file() and inside.is_file():
            stored = str(inside)
        if stored != DEFAULT and not Path(stored).is_file():
            raise InputError(stored, "model file of the index not found (moved?); pass --model")
        model_path = str(stored)
    model = load_model(model_path)
    store.check_model(model.fingerprint(), model_path)
    return model


class LocateResult:
    """One photo's answer: the record ``hafloc locate --json`` prints for it (``to_dict()``).

    ``lat``, ``lon``, ``confidence``: the estimate (None when there is none: ``unknown`` says why);
    ``matches``: best first, dicts with ``image``, ``root``, ``lat``, ``lon``, ``similarity``,
    ``distance_m``, ``inliers`` and the database ``id``.
    """

    __slots__ = ("_record",)

    def __init__(self, record: dict[str, Any]):
        self._record = copy.deepcopy(record)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record (a copy)."""
        return copy.deepcopy(self._record)

    @property
    def image(self) -> str:
        return str(self._record["image"])

    @property
    def estimate(self) -> dict[str, Any] | None:
        est = self._record.get("estimate")
        return dict(est) if est is not None else None

    @property
    def lat(self) -> float | None:
        return None if self.estimate is None else float(self.estimate["lat"])

    @property
    def lon(self) -> float | None:
        return None if self.estimate is None else float(self.estimate["lon"])

    @property
    def confidence(self) -> float | None:
        return None if self.estimate is None else float(self.estimate["confidence"])

    @property
    def calibrated(self) -> bool:
        return bool(self._record.get("calibrated"))

    @property
    def unknown(self) -> dict[str, Any] | None:
        return copy.deepcopy(self._record.get("unknown"))

    @property
    def matches(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self._record.get("matches", []))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocateResult) and other._record == self._record

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        where = (
            f"lat={self.lat}, lon={self.lon}, confidence={self.confidence}"
            if self.estimate is not None
            else f"unknown={(self.unknown or {}).get('reason')!r}"
        )
        return f"LocateResult(image={self.image!r}, {where}, matches={len(self._record.get('matches', []))})"


class Locator:
    """An open index, its model and an extractor; thread-safe for concurrent ``locate_image`` calls."""

    def __init__(
        self,
        index: str | Path,
        model_path: str | Path | GeoLocNet | None = None,
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
        # uncalibrated, the fallback confidence is gated by how similar blank and noise frames get here
        self.unrelated: float | None = None
        if self.calibrator is None:
            try:
                self.unrelated = unrelated_similarity(self.store, describe_probes(self.extractor))
            except ModelMismatchError:  # said by the first search, in the words of a query
                pass
        self.reranker: Reranker | None = None
        self.rerank_k = (DEFAULT_RERANK if self.store.local_config else 0) if c.rerank is None else c.rerank
        self.rerank_depth(self.rerank_k)  # checks it and loads the local features' extractor and matcher

    def rerank_depth(self, rerank: int | None = None) -> int:
        """Candidates to verify (``rerank``, default the configured number); loads the re-ranker when needed."""
        k = self.rerank_k if rerank is None else rerank
        if k < 0:
            raise HaflocError(f"--rerank must be 0 or more, got {k}")
        local = self.store.local_config
        if k and not local:
            raise HaflocError(
                f"{self.store.folder}: re-ranking needs local features in the index "
                "(build it with 'hafloc index build ... --local xfeat'), or pass --rerank 0"
            )
        if k and local and self.reranker is None:
            self.reranker = Reranker(
                local["extractor"], local.get("conf"), rule=FusionRule.from_dict(self.store.info.get("rerank"))
            )
        return k

    def close(self) -> None:
        self.store.close()

    def results(
        self,
        descs: np.ndarray,
        names: Sequence[str],
        k: int,
        local: Sequence[Any] | None = None,
        correspondences: bool = False,
        rerank: int | None = None,
        near: Near | None = None,
    ) -> list[dict[str, Any]]:
        """``result_json`` per query, each match also carrying its database ``id`` (for thumbnails).

        ``local``: the queries' local features (one per name) to re-rank the top ``rerank`` (default
        ``rerank_k``) by verified matches; ``correspondences``: the best match also carries its inlier
        pairs; ``near``: search only the photos within its radius (the result records it).
        """
        descs = np.atleast_2d(np.asarray(descs, dtype=np.float32))
        if len(names) == 0:
            return []
        rerank = self.rerank_depth(rerank) if local is not None else 0
        depth = max(k, rerank, self.calibrator.k if self.calibrator is not None else 0)
        all_matches: list[list[Match]] = self.store.search(descs, depth, near=near)  # type: ignore[assignment]
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
            res = answer(
                name, ms, k, self.agree_m, self.calibrator, self.config.min_confidence, min_inliers, self.unrelated
            )
            if near is not None:
                res["near"] = near.to_dict()
                if not ms:
                    res["unknown"]["reason"] = (
                        f"no indexed photo within {near.within_m:g} m of {near.lat:g},{near.lon:g}"
                    )
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
        self,
        paths: Sequence[Path],
        names: Sequence[str],
        k: int = 10,
        progress: bool = True,
        rerank: int | None = None,
        near: Near | None = None,
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Locate files in batches: (results in input order, failures [(name, reason)])."""
        res = self.extractor.extract_paths(list(paths), names=list(names), progress=progress)
        local = None
        if self.rerank_depth(rerank):
            assert self.reranker is not None
            by_name = dict(zip(names, paths))
            local = [self.reranker.features(self.extractor.load(by_name[n])) for n in res.names]
        return self.results(res.descriptors, res.names, k, local, rerank=rerank, near=near), res.failures

    def locate_image(
        self,
        img: Image.Image,
        name: str,
        k: int = 10,
        correspondences: bool = False,
        rerank: int | None = None,
        near: Near | None = None,
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Locate one decoded photo: (result, attention maps {level: (h, w)})."""
        out = self.extractor.describe_image(img)
        local = [self.reranker.features(img)] if self.rerank_depth(rerank) and self.reranker is not None else None
        res = self.results(out["descriptor"][None], [name], k, local, correspondences, rerank, near)[0]
        return res, out["attention"]

"""A disk cache of local features per image file, for evaluation runs that re-rank.

One ``.npz`` per (extractor, conf, image key) under ``cache_dir/local/<extractor>-<conf digest>/``,
written atomically, so concurrent runs at worst compute a file twice and never read half of one.
Descriptors are kept float16, as in the index.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from hafloc.fileio import atomic_path
from hafloc.local import LocalFeatures

log = logging.getLogger(__name__)


class LocalFeatureCache:
    """image key -> LocalFeatures for one extractor configuration."""

    def __init__(self, cache_dir: str | Path, extractor: str, conf: dict[str, Any]):
        digest = hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.folder = Path(cache_dir) / "local" / f"{extractor}-{digest}"

    def _path(self, key: str) -> Path:
        h = hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()
        return self.folder / h[:2] / f"{h}.npz"

    def get(self, key: str) -> LocalFeatures | None:
        p = self._path(key)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                if str(z["key"]) != key:
                    return None
                w, h = (int(v) for v in z["image_size"])
                return LocalFeatures(
                    keypoints=z["keypoints"].astype(np.float32),
                    descriptors=z["descriptors"].astype(np.float32),
                    scores=z["scores"].astype(np.float32),
                    image_size=(w, h),
                )
        except Exception as err:  # a damaged entry only costs a recomputation
            log.warning("ignoring unreadable local-feature cache entry %s (%s)", p, err)
            return None

    def put(self, key: str, feats: LocalFeatures) -> None:
        with atomic_path(self._path(key)) as tmp:
            np.savez(
                tmp,
                key=np.array(key),
                keypoints=feats.keypoints.astype(np.float32),
                descriptors=feats.descriptors.astype(np.float16),
                scores=feats.scores.astype(np.float32),
                image_size=np.array(feats.image_size, np.int64),
            )

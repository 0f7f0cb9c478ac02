"""The local features an index stores per chunk (``chunks/local_NNNNNN.h5``, hloc's layout) when
built with ``--local``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from hafloc.errors import InputError, printable
from hafloc.index.chunks import ChunkFiles
from hafloc.index.storebase import py_text

if TYPE_CHECKING:
    from hafloc.local import LocalFeatures


class LocalFeatureStore(ChunkFiles):
    """Reading stored local features (for re-ranking by verified matches)."""

    @property
    def local_config(self) -> dict[str, Any] | None:
        """{"extractor", "conf"} of the stored local features, None for a global-only index."""
        local = self.info.get("local")
        return dict(local) if isinstance(local, dict) else None

    def local_features(self, ids: Sequence[int]) -> "dict[int, LocalFeatures]":
        """Stored local features of database images by id ({} for a global-only index)."""
        if not self.local_config or not len(ids):
            return {}
        from hafloc.local import read_local_features

        ids = [int(i) for i in ids]
        rows: list[tuple[int, Any, int]] = []
        for start in range(0, len(ids), 500):  # sqlite's host-parameter limit
            part = ids[start : start + 500]
            rows += self._query(f"SELECT id, path, chunk FROM images WHERE id IN ({','.join('?' * len(part))})", part)
        out: dict[int, LocalFeatures] = {}
        for image_id, path, chunk in rows:
            p = self._chunk_path(int(chunk), "local")
            try:
                out[int(image_id)] = read_local_features(p, py_text(path))
            except (OSError, KeyError, ValueError) as err:
                raise InputError(
                    p, f"local features of {printable(py_text(path))} unreadable ({err}); the index is damaged"
                ) from None
        return out

    def local_bytes_per_image(self) -> float | None:
        """Average size on disk of one image's local features (None without local features)."""
        if not self.local_config:
            return None
        n = len(self)
        size = sum(f["local"].stat().st_size for f in self.chunk_files().values() if "local" in f)
        return size / n if n else 0.0

"""The position prior: search only the database photos within a radius of a known place
(``hafloc locate --near LAT,LON --within M``, ``Index.locate(near=..., within=...)``, ``POST /locate``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..datasets.geo import EARTH_RADIUS_M, haversine_m
from ..errors import HaflocError

_MARGIN_DEG = 1e-6  # the SQL box is widened by ~0.1 m; the exact distance decides


@dataclass(frozen=True)
class Near:
    """Photos within ``within_m`` metres (great-circle) of (``lat``, ``lon``)."""

    lat: float
    lon: float
    within_m: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lat) and math.isfinite(self.lon) and abs(self.lat) <= 90 and abs(self.lon) <= 180):
            raise HaflocError(f"--near: not a position: {self.lat:g},{self.lon:g} (lat within +-90, lon within +-180)")
        if not (math.isfinite(self.within_m) and self.within_m > 0):
            raise HaflocError(f"--within must be a positive number of metres, got {self.within_m:g}")

    @classmethod
    def parse(cls, near: str | tuple[float, float] | None, within_m: float | None) -> Near | None:
        """From "LAT,LON" (or a pair) and metres; both or neither."""
        if near is None and within_m is None:
            return None
        if near is None or within_m is None:
            raise HaflocError("--near LAT,LON and --within M go together")
        if isinstance(near, str):
            parts = near.replace(" ", "").split(",")
            try:
                lat, lon = (float(p) for p in parts)
            except ValueError:
                raise HaflocError(f"--near: expected LAT,LON in degrees, got {near!r}") from None
        else:
            lat, lon = near
        return cls(float(lat), float(lon), float(within_m))

    def to_dict(self) -> dict[str, float]:
        return {"lat": self.lat, "lon": self.lon, "within_m": self.within_m}

    def sql(self) -> tuple[str, list[Any]]:
        """A WHERE condition on ``lat`` / ``lon`` that every photo within the radius meets (a box)."""
        d = self.within_m / EARTH_RADIUS_M  # radians
        dlat = math.degrees(d) + _MARGIN_DEG
        cond, params = "lat BETWEEN ? AND ?", [self.lat - dlat, self.lat + dlat]
        if abs(self.lat) + dlat >= 90 or d >= math.pi / 2:
            return cond, params  # a pole is within reach: every longitude may be
        ratio = math.sin(d) / math.cos(math.radians(self.lat))
        if ratio >= 1:
            return cond, params
        dlon = math.degrees(math.asin(ratio)) + _MARGIN_DEG
        lo, hi = self.lon - dlon, self.lon + dlon
        if lo < -180:
            return cond + " AND (lon >= ? OR lon <= ?)", params + [lo + 360, hi]
        if hi > 180:
            return cond + " AND (lon >= ? OR lon <= ?)", params + [lo, hi - 360]
        return cond + " AND lon BETWEEN ? AND ?", params + [lo, hi]

    def contains(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """(N,) bool: which positions lie within the radius."""
        return np.asarray(haversine_m(self.lat, self.lon, lat, lon) <= self.within_m, bool)

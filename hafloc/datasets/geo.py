"""The geo helpers: lat/lon <-> UTM (one forced zone per call, so distances are consistent) and the
great-circle distance. Every function takes one point (floats in, floats out) or arrays."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import utm

EARTH_RADIUS_M = 6371008.8


def _parse_zone(zone: int | str | tuple[int, str] | None) -> tuple[int | None, str | None]:
    if zone is None:
        return None, None
    if isinstance(zone, tuple):
        return int(zone[0]), (str(zone[1]).upper() if zone[1] else None)
    if isinstance(zone, str):
        z = zone.strip().upper()
        if z[-1:].isalpha():
            return int(z[:-1]), z[-1]
        return int(z), None
    return int(zone), None


def majority_zone(lat: np.ndarray, lon: np.ndarray) -> tuple[int, str]:
    """The most common UTM zone (number, letter) of the points (ties: the first point's)."""
    lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    zones = [(int(utm.latlon_to_zone_number(a, o)), utm.latitude_to_zone_letter(a)) for a, o in zip(lat, lon)]
    counts = Counter(zones)
    best = max(counts.values())
    return next(z for z in zones if counts[z] == best)


def _scalar(*values: Any) -> bool:
    return all(np.ndim(v) == 0 for v in values)


def latlon_to_utm(lat, lon, zone: int | str | tuple[int, str] | None = None) -> tuple[Any, Any, int, str]:
    """WGS84 lat/lon -> (easting, northing, zone_number, zone_letter); floats for one point, else arrays.

    All points are projected into ONE zone: ``zone`` if given (17, "17T" or (17, "T")), else the
    majority zone of the points (one point: its own zone), so that distances across a zone
    border stay metric. ``ValueError`` beyond UTM's +-84 degrees or for non-finite input.
    """
    lat_a = np.atleast_1d(np.asarray(lat, dtype=np.float64))
    lon_a = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    if lat_a.shape != lon_a.shape:
        raise ValueError("lat and lon must have the same shape")
    if lat_a.size == 0:
        return np.zeros(0), np.zeros(0), int(zone and _parse_zone(zone)[0] or 0), ""
    if np.any(np.abs(lat_a) > 84.0) or np.any(np.abs(lon_a) > 180.0) or not np.all(np.isfinite(lat_a + lon_a)):
        raise ValueError("latitude must be within +-84 and longitude within +-180 degrees for UTM")
    number, letter = _parse_zone(zone)
    if number is None:
        number, letter = majority_zone(lat_a, lon_a)
    if letter is None:
        letter = majority_zone(lat_a, lon_a)[1]
    east, north, _, _ = utm.from_latlon(lat_a, lon_a, force_zone_number=number, force_zone_letter=letter)
    east, north = np.asarray(east, np.float64), np.asarray(north, np.float64)
    if _scalar(lat, lon):
        return float(east[0]), float(north[0]), int(number), str(letter)
    return east, north, int(number), str(letter)


def utm_to_latlon(easting, northing, zone_number: int, zone_letter: str) -> tuple[Any, Any]:
    """UTM -> WGS84 (lat, lon); floats for one point, else arrays."""
    e = np.atleast_1d(np.asarray(easting, dtype=np.float64))
    n = np.atleast_1d(np.asarray(northing, dtype=np.float64))
    lat, lon = utm.to_latlon(e, n, int(zone_number), zone_letter, strict=False)
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    if _scalar(easting, northing):
        return float(lat[0]), float(lon[0])
    return lat, lon


def haversine_m(lat1, lon1, lat2, lon2) -> Any:
    """Great-circle distance in metres (exact enough at any scale, unlike one UTM zone).

    Floats in, a float out (plain ``math``: per-pair loops stay fast); arrays broadcast to an array.
    """
    if _scalar(lat1, lon1, lat2, lon2):
        f1, f2 = math.radians(lat1), math.radians(lat2)
        dp, dl = f2 - f1, math.radians(lon2 - lon1)
        a = math.sin(dp / 2) ** 2 + math.cos(f1) * math.cos(f2) * math.sin(dl / 2) ** 2
        return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))
    p1, p2 = np.radians(np.asarray(lat1, np.float64)), np.radians(np.asarray(lat2, np.float64))
    dphi = p2 - p1
    dlmb = np.radians(np.asarray(lon2, np.float64) - np.asarray(lon1, np.float64))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))

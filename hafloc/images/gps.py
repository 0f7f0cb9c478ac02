"""GPS position from a photo's EXIF (Pillow's GPS IFD)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from hafloc.errors import InputError

_GPS_IFD = 0x8825
_LAT_REF, _LAT, _LON_REF, _LON = 1, 2, 3, 4


def _to_float(v) -> float:
    # Pillow gives IFDRational; older writers / other paths give (num, den) pairs.
    if isinstance(v, tuple) and len(v) == 2:
        num, den = v
        return float(num) / float(den)
    return float(v)


def _dms_to_degrees(dms) -> float:
    if isinstance(dms, (int, float)) or hasattr(dms, "numerator") and not isinstance(dms, tuple):
        return _to_float(dms)
    parts = [_to_float(x) for x in dms]
    parts += [0.0] * (3 - len(parts))
    return parts[0] + parts[1] / 60.0 + parts[2] / 3600.0


def gps_from_exif(exif) -> tuple[float, float] | None:
    """(lat, lon) from a PIL ``Image.Exif``; None if it has no usable GPS position."""
    try:
        gps = exif.get_ifd(_GPS_IFD)
    except Exception:
        return None
    if not gps or _LAT not in gps or _LON not in gps:
        return None
    try:
        lat = _dms_to_degrees(gps[_LAT])
        lon = _dms_to_degrees(gps[_LON])
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    lat_ref = str(gps.get(_LAT_REF, "N")).strip("\x00 ").upper()[:1] or "N"
    lon_ref = str(gps.get(_LON_REF, "E")).strip("\x00 ").upper()[:1] or "E"
    if lat_ref == "S":
        lat = -lat
    if lon_ref == "W":
        lon = -lon
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0) or (lat != lat or lon != lon):
        return None
    return lat, lon


def read_gps(path: str | Path) -> tuple[float, float] | None:
    """(lat, lon) in degrees from the image's EXIF GPS tags, or None when it has none.

    Raises ``InputError`` if the file is missing or not an image.
    """
    try:
        with Image.open(path) as im:
            return gps_from_exif(im.getexif())
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except Image.DecompressionBombError as e:  # Pillow's own cap (images.io explains why we keep it)
        raise InputError(path, f"image too large ({str(e).split(',')[0]})") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(path, f"not a readable image ({e.__class__.__name__})") from None

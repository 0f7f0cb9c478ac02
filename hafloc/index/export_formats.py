"""``hafloc locate`` results as files other tools read: JSON, CSV, GeoJSON, KML, or a readable table.

Every writer takes the locate document ``{"index": ..., "results": [result_json, ...],
"failures": [{"image", "error"}, ...]}`` and returns text, so the CLI (and the server, if it ever
offers downloads) only chooses a format and where the text goes. One feature / row / placemark
per located photo, carrying its estimate, confidence and best match. Keys a result gains later
(e.g. ``calibrated``, ``estimate.verified``, ``unknown``) pass through to GeoJSON properties and
CSV columns without changes here.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Callable

from hafloc.errors import HaflocError
from hafloc.fileio import atomic_path

FORMATS = ("table", "json", "csv", "geojson", "kml")
_CORE_RESULT = {"image", "estimate", "matches", "unknown", "attention"}
_CORE_ESTIMATE = {"lat", "lon", "confidence"}
_SCALAR = (str, int, float, bool, type(None))


def _top(res: dict[str, Any]) -> dict[str, Any] | None:
    return res["matches"][0] if res.get("matches") else None


def _confidence(res: dict[str, Any]) -> float | None:
    """The estimate's confidence, or the one an "unknown" answer was refused at."""
    if res.get("estimate"):
        return res["estimate"].get("confidence")
    return (res.get("unknown") or {}).get("confidence")


def _why_unknown(res: dict[str, Any]) -> str | None:
    if res.get("estimate"):
        return None
    return (res.get("unknown") or {}).get("reason") or "no match has a position"


def _extras(res: dict[str, Any]) -> dict[str, Any]:
    """Scalar keys beyond the core ones: top-level as-is, the estimate's as ``estimate_KEY``."""
    out = {k: v for k, v in res.items() if k not in _CORE_RESULT and isinstance(v, _SCALAR)}
    for k, v in (res.get("estimate") or {}).items():
        if k not in _CORE_ESTIMATE and isinstance(v, _SCALAR):
            out[f"estimate_{k}"] = v
    return out


def summary_row(res: dict[str, Any], radius_m: float | None = None) -> dict[str, Any]:
    """One photo flattened: estimate, confidence, radius and the best match (None where absent)."""
    est, top = res.get("estimate"), _top(res)
    row = {
        "image": res["image"],
        "lat": est["lat"] if est else None,
        "lon": est["lon"] if est else None,
        "confidence": _confidence(res),
        "radius_m": res.get("radius_m", radius_m) if est else None,
        "unknown_reason": _why_unknown(res),
        "top_image": top["image"] if top else None,
        "top_similarity": top["similarity"] if top else None,
        "top_distance_m": top["distance_m"] if top else None,
        "top_lat": top["lat"] if top else None,
        "top_lon": top["lon"] if top else None,
        "n_matches": len(res.get("matches") or []),
    }
    row.update({k: v for k, v in _extras(res).items() if k not in row})
    return row


def to_json(doc: dict[str, Any], radius_m: float | None = None) -> str:
    return json.dumps(doc, indent=2) + "\n"


def to_csv(doc: dict[str, Any], radius_m: float | None = None) -> str:
    """A header and one row per located photo, then one per failed photo (only ``image`` and ``error``).

    RFC 4180: comma separated, fields quoted when they hold a comma, quote or line break, CRLF
    line ends; empty fields for "none". Columns: those of ``summary_row`` plus any extras seen.
    """
    rows = [summary_row(r, radius_m) for r in doc["results"]]
    columns = list(summary_row({"image": "", "estimate": None, "matches": []}))
    for row in rows:
        columns += [k for k in row if k not in columns]
    columns.append("error")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\r\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if v is None else v for k, v in row.items()})
    for f in doc.get("failures", []):
        w.writerow({"image": f["image"], "error": f["error"]})
    return buf.getvalue()


def to_geojson_dict(doc: dict[str, Any], radius_m: float | None = None) -> dict[str, Any]:
    """RFC 7946 FeatureCollection: a Point ``[lon, lat]`` per estimate, ``geometry: null`` when unknown.

    Properties: the summary row plus the full ``estimate``, ``unknown`` and ``top_match`` objects;
    failures ride along as the foreign member ``failures``.
    """
    features = []
    for res in doc["results"]:
        est = res.get("estimate")
        props = summary_row(res, radius_m)
        props.update({"estimate": est, "unknown": res.get("unknown"), "top_match": _top(res)})
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [est["lon"], est["lat"]]} if est else None,
                "properties": props,
            }
        )
    return {"type": "FeatureCollection", "features": features, "failures": list(doc.get("failures", []))}


def to_geojson(doc: dict[str, Any], radius_m: float | None = None) -> str:
    return json.dumps(to_geojson_dict(doc, radius_m), indent=2) + "\n"


def _describe(row: dict[str, Any]) -> str:
    lines = []
    if row["lat"] is not None:
        lines.append(f"estimate {row['lat']:.6f}, {row['lon']:.6f}")
    else:
        lines.append(f"no estimate: {row['unknown_reason']}")
    if row["confidence"] is not None:
        lines.append(
            f"confidence {row['confidence']:.2f}"
            + (f" (within {row['radius_m']:g} m)" if row["radius_m"] is not None else "")
        )
    if row["top_image"] is not None:
        dist = "" if row["top_distance_m"] is None else f", {row['top_distance_m']:.1f} m away"
        lines.append(f"best match {row['top_image']} (similarity {row['top_similarity']:.3f}{dist})")
    return "\n".join(lines)


_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def xml_text(value: Any) -> Any:
    """Strings made XML-safe as the CSV writes them: a name byte that is not UTF-8
    (surrogate-escaped) becomes ``\\udcNN`` (as in JSON and CSV), a control character ``\\xNN``."""
    if isinstance(value, str):
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        return _XML_FORBIDDEN.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
    if isinstance(value, dict):
        return {k: xml_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [xml_text(v) for v in value]
    return value


def to_kml(doc: dict[str, Any], radius_m: float | None = None) -> str:
    """KML (simplekml): a Placemark per located photo with a description and ExtendedData.

    A photo without an estimate gets an empty MultiGeometry: listed, never drawn at 0, 0. Names
    are written as ``xml_text`` gives them.
    """
    import simplekml

    doc = xml_text(doc)
    kml = simplekml.Kml(name="hafloc locate")
    if doc.get("failures"):
        kml.document.description = "not located: " + "; ".join(f"{f['image']}: {f['error']}" for f in doc["failures"])
    for res in doc["results"]:
        row = summary_row(res, radius_m)
        if row["lat"] is not None:
            pm = kml.newpoint(name=row["image"], description=_describe(row), coords=[(row["lon"], row["lat"])])
        else:
            pm = kml.newmultigeometry(name=row["image"], description=_describe(row))
        for k, v in row.items():
            if v is not None and k != "image":
                pm.extendeddata.newdata(name=k, value=str(v))
    return kml.kml()


def _fmt(v: float | None, spec: str) -> str:
    return format(v, spec) if v is not None else format("-", ">" + spec.split(".")[0])


def _human_m(d: float) -> str:
    return f"{d:.1f} m" if d < 1000 else f"{d / 1000:.1f} km"


def table_block(res: dict[str, Any]) -> str:
    """One photo's result as a readable block (estimate line, then a row per match)."""
    est = res["estimate"]
    if est is None:
        why = _why_unknown(res)
        what = "no estimate" if why == "no match has a position" else "unknown"  # refused by --min-confidence
        lines = [f"{res['image']}: {what} ({why})"]
    else:
        kind = (
            f"calibrated for {res['radius_m']:g} m" if res.get("calibrated") and "radius_m" in res else "uncalibrated"
        )
        reranked = any(m.get("inliers") is not None for m in res["matches"])
        verified = ", verified" if est.get("verified") else (", not verified" if reranked else "")
        lines = [
            f"{res['image']}: {est['lat']:.6f}, {est['lon']:.6f}  "
            f"(confidence {est['confidence']:.2f}, {kind}{verified})"
        ]
    lines.append(f"  {'#':>2}  {'similarity':>10}  {'inliers':>7}  {'from est.':>10}  {'lat':>11}  {'lon':>11}  image")
    for i, m in enumerate(res["matches"], 1):
        dist = "-" if m["distance_m"] is None else _human_m(m["distance_m"])
        inl = "-" if m.get("inliers") is None else str(m["inliers"])
        lines.append(
            f"  {i:>2}  {m['similarity']:>10.4f}  {inl:>7}  {dist:>10}  {_fmt(m['lat'], '11.6f')}  "
            f"{_fmt(m['lon'], '11.6f')}  {m['image']}"
        )
    return "\n".join(lines) + "\n"


def to_table(doc: dict[str, Any], radius_m: float | None = None) -> str:
    return "".join(table_block(r) + "\n" for r in doc["results"])


WRITERS: dict[str, Callable[[dict[str, Any], float | None], str]] = {
    "table": to_table,
    "json": to_json,
    "csv": to_csv,
    "geojson": to_geojson,
    "kml": to_kml,
}


def render(doc: dict[str, Any], fmt: str, radius_m: float | None = None) -> str:
    """The locate document as text in ``fmt`` (one of ``FORMATS``)."""
    if fmt not in WRITERS:
        raise HaflocError(f"unknown output format {fmt!r} (choose from {', '.join(FORMATS)})")
    return WRITERS[fmt](doc, radius_m)


def write_output(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a failure leaves any old file as it was and no partial file."""
    path = Path(path)
    if path.is_dir():
        raise HaflocError(f"{path}: is a folder; --output needs a file name")
    try:
        with atomic_path(path) as tmp:  # names that are not valid UTF-8 come out escaped, never as a crash
            tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
    except OSError as err:
        raise HaflocError(f"{path}: cannot write ({err.strerror or err})") from None

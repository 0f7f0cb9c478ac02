"""What ``hafloc index info`` reports about an index: counts, position sources, its calibration and
its footprint (RAM and disk), as one JSON-ready dict (``index_info``); the CLI only presents it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any


def calibration_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The calibration's description without its per-sample arrays."""
    return {k: v for k, v in meta.items() if k != "heldout"}


def calibration_info(index: str | Path) -> dict[str, Any] | None:
    """What ``index info`` shows about the calibration (None when the index has none)."""
    from .calibrate import calibration_path, load_calibrator
    from .store import IndexStore

    if not calibration_path(index).is_file():
        return None
    with IndexStore.open(index) as store:
        cal = load_calibrator(store)
        images = len(store)
    if cal is None:
        return {"usable": False, "reason": "fitted for another model; rerun 'hafloc index calibrate'"}
    # photos added since: the fit still applies, but a rerun would learn from them too
    return {"usable": True, "stale": cal.meta.get("index_images") != images, **calibration_summary(cal.meta)}


def index_info(index: str | Path) -> dict:
    """What ``hafloc index info --json`` prints."""
    from .store import IndexStore

    with IndexStore.open(index) as store:
        rows = store.images()
        info = dict(store.info)
        if store.local_config:
            info["local"] = dict(store.local_config, bytes_per_image=round(store.local_bytes_per_image() or 0.0))
    sources = Counter(r["position_source"] or "none" for r in rows)
    info["counts"] = {
        "images": len(rows),
        "positioned": len(rows) - sources.get("none", 0),
        "unpositioned": sources.get("none", 0),
    }
    info["position_sources"] = dict(sorted(sources.items()))
    info["roots"] = sorted({r["root"] for r in rows})
    info["index"] = str(Path(index))
    info["calibration"] = calibration_info(index)
    info["footprint"] = footprint_info(Path(index), info)
    return info


def footprint_info(folder: Path, info: dict) -> dict:
    """RAM and disk the index needs to serve: estimated from its size and search parameters, and
    actual (files on disk, local features included; RAM = what opening the search reads into memory
    or maps). Bytes throughout."""
    from .ondisk import disk_usage, footprint, ondisk_paths
    from .search import SearchConfig, resolve_params
    from .store import chunk_files

    n, dim = info["counts"]["images"], int(info["dim"])
    params = resolve_params(n, dim, SearchConfig.from_dict(info.get("search", {})))
    vec_bytes = 2 if info.get("dtype") == "float16" else 4
    est = footprint(n, dim, params, vec_bytes)
    files = chunk_files(folder).values()
    chunks = sum(f["descriptors"].stat().st_size for f in files if "descriptors" in f)
    local = sum(f["local"].stat().st_size for f in files if "local" in f)
    # local features: as many bytes per image as the stored ones take
    est["disk_bytes"] = max(est["disk_bytes"], n * dim * vec_bytes) + round(
        n * (info.get("local") or {}).get("bytes_per_image", 0)
    )
    index_p = folder / "search.faiss"
    search_files = [index_p, folder / "search.ids.npy", ondisk_paths(index_p)["rows"]]
    ram = sum(p.stat().st_size for p in search_files if p.is_file())
    return {
        "search": params["kind"],
        "estimated": est,
        "actual": {
            "ram_bytes": ram,
            "disk_bytes": chunks
            + local
            + disk_usage(index_p)
            + sum(p.stat().st_size for p in (folder / "search.ids.npy", folder / "meta.sqlite") if p.is_file()),
            "descriptor_bytes": chunks,
            "local_bytes": local,
        },
    }

"""Writing the synthetic city: every split rendered into the '@' layout plus ``meta.json``."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hafloc.datasets.atfolders import at_name
from hafloc.errors import HaflocError
from hafloc.synth.assets import Assets
from hafloc.synth.config import (
    CAMERA_HEIGHT_M,
    FORMAT_VERSION,
    GENERATOR,
    META_NAME,
    QUERY_FRACTION,
    SPLITS,
    TIMESTAMP,
    SyntheticCityConfig,
)
from hafloc.synth.render import finish, render
from hafloc.synth.scene import Camera, Place, camera, db_fraction, make_places, pick, rng_of


def _write_split(root: Path, split: str, cfg: SyntheticCityConfig, assets: Assets, pbar: Any) -> dict[str, list]:
    """Render and save one split; return its meta.json entries."""
    s = SPLITS.index(split)
    entries: dict[str, list] = {"database": [], "queries": []}
    for kind in entries:
        (root / "images" / split / kind).mkdir(parents=True, exist_ok=True)
    for place in make_places(split, cfg, assets):
        near_up = bool(rng_of(cfg.seed, s, place.index, 1).random() < 0.5)
        dir_sign = 1 if place.heading == 180.0 else -1  # +1: the route runs east here
        # Queries within 3 m of the centre, db images 1..5 m along the street: <= 8.5 m apart.
        q_rngs = [rng_of(cfg.seed, s, place.index, 3, k) for k in range(cfg.queries_per_place)]
        q_cams = [
            camera(r, QUERY_FRACTION[place.size], pick(r, cfg.query_conditions), r.uniform(-2.0, 2.0)) for r in q_rngs
        ]
        for k in range(cfg.db_per_place):
            rng = rng_of(cfg.seed, s, place.index, 2, k)
            side = -1 if k % 2 == 0 else 1
            cam = camera(
                rng,
                db_fraction(q_cams[0].fraction, k, place.size, near_up),
                pick(rng, cfg.db_conditions),
                side * rng.uniform(2.0, 4.0),
            )
            entries["database"].append(_emit_image(root, split, "database", place, cam, k, dir_sign, cfg, assets, rng))
            pbar.update(1)
        for k, (rng, cam) in enumerate(zip(q_rngs, q_cams)):
            entries["queries"].append(_emit_image(root, split, "queries", place, cam, k, dir_sign, cfg, assets, rng))
            pbar.update(1)
    return entries


def _emit_image(
    root: Path,
    split: str,
    kind: str,
    place: Place,
    cam: Camera,
    k: int,
    dir_sign: int,
    cfg: SyntheticCityConfig,
    assets: Assets,
    rng: np.random.Generator,
) -> dict[str, Any]:
    H, W = cfg.image_size
    img = finish(render(place, cam, assets, H, W, rng), cam.condition, rng)
    east = place.easting + dir_sign * cam.along_m
    north = place.northing + cam.across_m
    role = "d" if kind == "database" else "q"
    date = "20210615" if kind == "database" else "20220110"
    name = at_name(
        east,
        north,
        cfg.utm_zone,
        cfg.utm_letter,
        pano=f"{place.place_id}{role}{k}",
        heading=place.heading,
        pitch=0.0,
        height=CAMERA_HEIGHT_M,
        timestamp=date + TIMESTAMP[cam.condition],
        note=f"size-{place.size}" if kind == "queries" else "",
    )
    rel = f"images/{split}/{kind}/{name}"
    img.save(root / rel, format="JPEG", quality=cfg.jpeg_quality)
    entry = {
        "file": rel,
        "place": place.place_id,
        "condition": cam.condition,
        "landmark_fraction": round(cam.fraction, 4),
        "easting": round(east, 2),
        "northing": round(north, 2),
    }
    if kind == "queries":
        entry["size"] = place.size
    return entry


def _read_meta(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / META_NAME).read_text())
    except (OSError, ValueError):
        return None


def generate_city(root: str | Path, config: SyntheticCityConfig | None = None, progress: bool = True) -> Path:
    """Write the synthetic world to ``root`` (an '@' dataset plus ``meta.json``); return ``root``.

    Idempotent: nothing happens when ``root/meta.json`` holds the same config. The world is built
    in a temporary folder beside ``root`` and renamed into place, so a crash leaves no half
    dataset. An existing ``root`` made by this generator with another config is replaced; any
    other non-empty folder is refused.
    """
    from tqdm import tqdm

    cfg = config or SyntheticCityConfig()
    cfg.validate()
    root = Path(root)
    meta = _read_meta(root)
    if meta is not None and meta.get("config") == cfg.to_json() and meta.get("version") == FORMAT_VERSION:
        return root
    if root.exists() and any(root.iterdir()) and (meta is None or meta.get("generator") != GENERATOR):
        raise HaflocError(
            f"{root}: exists and is not a synthetic city (no generator {META_NAME}); choose another folder"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        assets = Assets()
        splits = [s for s in SPLITS if s in cfg.places_per_split]
        total = sum(cfg.places_per_split[s] for s in splits) * (cfg.db_per_place + cfg.queries_per_place)
        out: dict[str, Any] = {"generator": GENERATOR, "version": FORMAT_VERSION, "config": cfg.to_json(), "splits": {}}
        with tqdm(total=total, desc="synthetic city", unit="img", disable=not progress) as pbar:
            for split in splits:
                out["splits"][split] = _write_split(tmp, split, cfg, assets, pbar)
        (tmp / META_NAME).write_text(json.dumps(out, indent=1) + "\n")
        _swap_in(tmp, root, cfg)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _swap_in(tmp: Path, root: Path, cfg: SyntheticCityConfig) -> None:
    """Rename the finished folder onto ``root`` (moving an older world aside first)."""
    old = None
    if root.exists():
        if not any(root.iterdir()):
            root.rmdir()
        else:
            old = root.with_name(f".{root.name}.old-{os.getpid()}")
            os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        # Lost a race with another generator: fine if it wrote the same world.
        meta = _read_meta(root)
        if meta is None or meta.get("config") != cfg.to_json():
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

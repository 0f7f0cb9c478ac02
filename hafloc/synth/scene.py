"""The synthetic world's layout: places (a street of facades and one landmark) and camera views."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hafloc.synth.assets import COLORMAPS, Assets, resize
from hafloc.synth.config import (
    CONDITIONS,
    DB_SCALE_RATIOS,
    FRACTION_LIMITS,
    SIZE_CLASSES,
    SPLITS,
    SyntheticCityConfig,
)


@dataclass
class Building:
    x0: float
    x1: float
    height: float
    style: int


@dataclass
class Place:
    split: str
    index: int
    size: str  # size class of this place's queries
    easting: float
    northing: float
    heading: float  # camera heading (deg): facing the right-hand side of the route
    landmark: np.ndarray  # (h, w, 3) panel texture
    landmark_alpha: np.ndarray  # (h, w) shape mask
    frame_color: np.ndarray
    landmark_w: float  # metres
    landmark_h: float
    pedestal_h: float
    pedestal_color: np.ndarray
    gap: float  # landmark-to-facade depth (m)
    buildings: list[Building]
    trees: list[float]  # tree x positions (m)

    @property
    def place_id(self) -> str:
        return f"{self.split}-{self.index:04d}"


def rng_of(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def landmark_texture(assets: Assets, rng: np.random.Generator, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """A distinctive panel: a crop of a sample photo, recoloured, with an emblem; and its shape mask."""
    use_color = assets.color and (not assets.gray or rng.random() < 0.6)
    pool = assets.color if use_color else assets.gray
    src = pool[int(rng.integers(len(pool)))]
    sh, sw = src.shape[:2]
    for _ in range(8):  # avoid near-uniform crops (sky, background): they would not be distinctive
        side = rng.uniform(0.35, 0.8) * min(sh, sw)
        cw, ch = (side, side * aspect) if aspect <= 1 else (side / aspect, side)
        y0 = rng.uniform(0, sh - ch)
        x0 = rng.uniform(0, sw - cw)
        crop = src[int(y0) : int(y0 + ch), int(x0) : int(x0 + cw)]
        if float(crop[::4, ::4].std()) > 0.12:
            break
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    th, tw = int(round(160 * aspect)), 160
    tex = resize(crop, tw, th, Image.Resampling.BICUBIC)
    if not use_color:
        import matplotlib

        cmap = matplotlib.colormaps[COLORMAPS[int(rng.integers(len(COLORMAPS)))]]
        tex = cmap(tex.mean(axis=2))[..., :3].astype(np.float32)
    elif rng.random() < 0.4:  # rotate hues: more distinct panels from the same few photos
        shift = rng.uniform(0.15, 0.85)
        hsv = np.asarray(Image.fromarray((tex * 255).astype(np.uint8)).convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(shift * 255)) % 256).astype(np.uint8)
        tex = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), np.float32) / 255.0
    tex = np.ascontiguousarray(tex)
    yy, xx = np.mgrid[0:th, 0:tw].astype(np.float32)
    if rng.random() < 0.7:  # emblem: a coloured disc or ring
        r = rng.uniform(0.12, 0.25) * tw
        cx, cy = rng.uniform(r, tw - r), rng.uniform(r, th - r)
        d = np.hypot(xx - cx, yy - cy)
        m = (d < r) & ((d > 0.55 * r) | (rng.random() < 0.5))
        tex[m] = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1), rng.uniform(0.7, 1)), np.float32)
    shape = int(rng.integers(3))
    u, v = (xx + 0.5) / tw * 2 - 1, (yy + 0.5) / th * 2 - 1
    if shape == 0:
        alpha = np.ones((th, tw), np.float32)
    elif shape == 1:  # round sign
        alpha = (u * u + v * v <= 1).astype(np.float32)
    else:  # arch: semicircular top
        k = tw / th
        alpha = ((v >= -1 + k) | (u * u + ((v + 1 - k) / k) ** 2 <= 1)).astype(np.float32)
    return tex, alpha


def street(rng: np.random.Generator, n_styles: int) -> tuple[list[Building], list[float]]:
    """A row of buildings spanning +-120 m around the landmark, and tree positions."""
    buildings, x = [], -120.0 - rng.uniform(0, 10)
    while x < 120:
        w = rng.uniform(7, 16)
        buildings.append(Building(x, x + w, rng.uniform(8, 30), int(rng.integers(n_styles))))
        x += w + (rng.uniform(0.5, 3) if rng.random() < 0.3 else 0.0)
    trees = [float(t) for t in np.arange(-120, 120, rng.uniform(9, 14)) + rng.uniform(0, 5)]
    return buildings, trees


def make_places(split: str, cfg: SyntheticCityConfig, assets: Assets) -> list[Place]:
    s = SPLITS.index(split)
    n = cfg.places_per_split[split]
    sizes = [SIZE_CLASSES[i % 3] for i in rng_of(cfg.seed, s, 999).permutation(n)]
    # Few facade arrangements per split: several places share one street look exactly.
    n_arr = max(3, n // 4)
    arrangements = [street(rng_of(cfg.seed, s, 5000 + a), len(assets.styles)) for a in range(n_arr)]
    # Route: rows of 10 places along an east-west street, rows 80 m apart, one area per split.
    e0 = cfg.origin_easting + s * cfg.split_gap_m
    places = []
    for i in range(n):
        rng = rng_of(cfg.seed, s, i, 0)
        row, col = divmod(i, 10)
        col = col if row % 2 == 0 else 9 - col  # serpentine route
        aspect = float(rng.uniform(0.6, 1.3))
        tex, alpha = landmark_texture(assets, rng, aspect)
        w_m = float(rng.uniform(2.5, 3.5))
        buildings, trees = arrangements[int(rng.integers(n_arr))]
        places.append(
            Place(
                split=split,
                index=i,
                size=sizes[i],
                easting=e0 + col * cfg.place_spacing_m,
                northing=cfg.origin_northing + row * 80.0,
                heading=180.0 if row % 2 == 0 else 0.0,  # even rows run east, odd rows west
                landmark=tex,
                landmark_alpha=alpha,
                frame_color=np.array(
                    colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.15, 0.95)), np.float32
                ),
                landmark_w=w_m,
                landmark_h=w_m * aspect,
                pedestal_h=float(rng.uniform(0.5, 1.4)),
                pedestal_color=np.array([rng.uniform(0.3, 0.8)] * 3, np.float32)
                * np.array([1, 0.97, 0.92], np.float32),
                gap=float(rng.uniform(5, 9)),
                buildings=buildings,
                trees=trees,
            )
        )
    return places


@dataclass
class Camera:
    fraction: float  # landmark width / image width
    u_frac: float  # landmark centre, as a fraction of the width
    fov_deg: float
    horizon: float  # fraction of height
    condition: str
    along_m: float  # recorded-position offsets from the place centre (m)
    across_m: float


def pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = [c for c in CONDITIONS if weights.get(c, 0) > 0]
    p = np.array([weights[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def db_fraction(q_frac: float, k: int, size: str, near_up: bool) -> tuple[float, float]:
    """Landmark-fraction range of the k-th database view of a place whose first query shows ``q_frac``.

    Small landmarks are seen larger in the database, large ones smaller; for medium ones the near
    view goes either way and the far view is always smaller (which keeps every range in bounds).
    """
    lo, hi = DB_SCALE_RATIOS[k % 2]
    up = {"small": True, "large": False}.get(size, near_up if k % 2 == 0 else False)
    a, b = (q_frac * lo, q_frac * hi) if up else (q_frac / hi, q_frac / lo)
    return max(a, FRACTION_LIMITS[0]), max(min(b, FRACTION_LIMITS[1]), FRACTION_LIMITS[0])


def camera(rng: np.random.Generator, fraction_range: tuple[float, float], condition: str, along: float) -> Camera:
    frac = float(rng.uniform(*fraction_range))
    spread = max(0.0, 0.42 - frac / 2)  # keep the landmark inside the frame
    return Camera(
        fraction=frac,
        u_frac=float(0.5 + rng.uniform(-spread, spread)),
        fov_deg=float(rng.uniform(55, 68)),
        horizon=float(rng.uniform(0.48, 0.58)),
        condition=condition,
        along_m=float(along + rng.uniform(-1, 1)),
        across_m=float(rng.uniform(-1.5, 1.5)),
    )

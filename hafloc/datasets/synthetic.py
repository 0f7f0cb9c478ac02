"""Deterministic synthetic street world for the demo, written in the '@' folder layout.

Each place is a stretch of street: a row of facades drawn from a few shared styles (so that a
wrong place looks plausible) and one place-specific landmark (a framed crop of a scikit-image
sample photo on a pedestal). Database images are daytime views; queries are mostly dusk/night
views of the same place from another viewpoint, with the landmark at a different apparent size.
Each query's size class (the landmark's width in the query: small ~5-10 %, medium ~20-30 %,
large ~50 %+ of the image width) goes in its ``note`` field and in ``meta.json``.

Apparent size changes come from the viewing distance of a pinhole camera (parallax between
landmark and facades included); the recorded GPS positions are the place's position jittered
by a few metres, so every query has a same-place database image within 10 m and every other
place is more than 25 m away. Splits lie in disjoint areas of UTM zone 17T (Pittsburgh-like).

Nothing is downloaded: textures come from the photos bundled inside scikit-image.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import utm
from PIL import Image, ImageFilter

from hafloc.errors import HaflocError, InputError

__all__ = ["SyntheticCityConfig", "generate_city", "size_classes", "read_meta", "at_name", "SIZE_CLASSES", "CONDITIONS"]

SPLITS = ("train", "val", "test")
SIZE_CLASSES = ("small", "medium", "large")
CONDITIONS = ("day", "dusk", "night")
META_NAME = "meta.json"
FORMAT_VERSION = 1
GENERATOR = "hafloc.datasets.synthetic"

# Landmark width as a fraction of the image width, per class (query) and per database option.
_QUERY_FRACTION = {"small": (0.05, 0.10), "medium": (0.20, 0.30), "large": (0.50, 0.65)}
# Database views change the landmark's scale by these factors (the first is the "near" view that
# an ImageNet CNN can still match; the second makes a small landmark large and vice versa).
_DB_SCALE_RATIOS = ((1.25, 1.6), (2.5, 4.0))
_FRACTION_LIMITS = (0.05, 0.65)
_TIMESTAMP = {"day": "1200", "dusk": "1930", "night": "2300"}
_CAMERA_HEIGHT_M = 1.6


@dataclass
class SyntheticCityConfig:
    """What to generate; two equal configs give byte-identical datasets."""

    seed: int = 0
    places_per_split: dict[str, int] = field(default_factory=lambda: {"train": 60, "val": 20, "test": 40})
    db_per_place: int = 2
    queries_per_place: int = 1
    image_size: tuple[int, int] = (256, 320)  # (H, W), multiples of 32 (240 is not)
    jpeg_quality: int = 90
    query_conditions: dict[str, float] = field(default_factory=lambda: {"day": 0.2, "dusk": 0.4, "night": 0.4})
    db_conditions: dict[str, float] = field(default_factory=lambda: {"day": 1.0})
    place_spacing_m: float = 50.0  # between neighbouring place centres along the route
    utm_zone: int = 17
    utm_letter: str = "T"
    origin_easting: float = 584000.0  # downtown Pittsburgh lies around 584-590 km E, 4474-4480 km N
    origin_northing: float = 4476000.0
    split_gap_m: float = 1500.0  # offset between split areas

    @classmethod
    def quick(cls, seed: int = 0) -> "SyntheticCityConfig":
        """A small world for a demo that must finish in a few minutes."""
        return cls(seed=seed, places_per_split={"train": 20, "val": 8, "test": 15})

    def validate(self) -> None:
        h, w = self.image_size
        if h % 32 or w % 32 or h < 64 or w < 64:
            raise ValueError(f"image_size must be multiples of 32 and >= 64, got {self.image_size}")
        if set(self.places_per_split) - set(SPLITS):
            raise ValueError(f"places_per_split keys must be among {SPLITS}, got {sorted(self.places_per_split)}")
        if any(n < 1 for n in self.places_per_split.values()):
            raise ValueError("every split needs at least one place")
        if self.db_per_place < 1 or self.queries_per_place < 1:
            raise ValueError("db_per_place and queries_per_place must be >= 1")
        for name, weights in (("query_conditions", self.query_conditions), ("db_conditions", self.db_conditions)):
            if not weights or set(weights) - set(CONDITIONS) or min(weights.values()) < 0 or sum(weights.values()) <= 0:
                raise ValueError(f"{name} must weight conditions among {CONDITIONS}, got {weights}")
        if self.place_spacing_m < 40:
            # positions are jittered by up to 5 m: 40 m keeps other places beyond 25 m
            raise ValueError("place_spacing_m must be >= 40")

    def to_json(self) -> dict[str, Any]:
        """The config as JSON-compatible data (what meta.json stores and compares)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SyntheticCityConfig":
        cfg = cls(**data)
        return replace(cfg, image_size=tuple(cfg.image_size))


# --------------------------------------------------------------------------------------------
# Assets: textures from scikit-image's bundled photos, loaded once per generation
# --------------------------------------------------------------------------------------------

_COLOR_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "colorwheel", "logo")
_GRAY_SOURCES = ("camera", "coins", "moon", "page", "text", "clock", "cell", "horse")
_COLORMAPS = ("viridis", "plasma", "magma", "cividis", "twilight", "turbo", "copper", "spring",
              "cool", "autumn", "ocean", "terrain")


def _to_float_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.float32)
    elif img.dtype != np.float32 and img.dtype != np.float64:
        img = img.astype(np.float32) / 255.0
    img = img.astype(np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:  # RGBA logo: composite on white
        a = img[..., 3:4]
        img = img[..., :3] * a + (1 - a)
    lo, hi = float(img.min()), float(img.max())
    if hi > 1.0 or lo < 0.0:
        img = (img - lo) / max(hi - lo, 1e-6)
    return np.ascontiguousarray(img[..., :3])


def _resize(img: np.ndarray, w: int, h: int, resample: int = Image.BILINEAR) -> np.ndarray:
    """Resize a float RGB array (via 8-bit Pillow: fast and deterministic)."""
    pil = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.asarray(pil.resize((max(w, 1), max(h, 1)), resample), dtype=np.float32) / 255.0


@dataclass
class _WallStyle:
    texture: np.ndarray  # (S, S, 3) float, one tile covering tile_m metres
    tile_m: float
    win_dx: float  # window pitch (m)
    win_dy: float
    win_w: float  # window size (m)
    win_h: float
    glass: tuple[float, float, float]
    frame: tuple[float, float, float]


class _Assets:
    """Source photos, wall styles and the ground texture."""

    def __init__(self) -> None:
        import skimage.data as skd  # heavy import, only when generating

        def load(name: str) -> np.ndarray | None:
            try:
                return _to_float_rgb(getattr(skd, name)())
            except Exception:  # a sample that needs the optional download: just go without it
                return None

        self.color = [a for a in (load(n) for n in _COLOR_SOURCES) if a is not None]
        self.gray = [a for a in (load(n) for n in _GRAY_SOURCES) if a is not None]
        brick, gravel, grass = load("brick"), load("gravel"), load("grass")
        noise = np.random.default_rng(12345).random((256, 256)).astype(np.float32)
        noise = np.repeat(noise[..., None], 3, axis=2)
        brick = brick if brick is not None else noise
        gravel = gravel if gravel is not None else noise
        grass = grass if grass is not None else noise
        if not self.color and not self.gray:
            self.gray = [noise]

        def tint(tex: np.ndarray, rgb: tuple[float, float, float], contrast: float) -> np.ndarray:
            t = _resize(tex, 256, 256)
            t = (t - t.mean()) * contrast + 0.5
            return np.clip(t * np.array(rgb, np.float32) * 1.6, 0, 1)

        panels = np.full((256, 256, 3), 0.5, np.float32)
        panels[::64, :] = 0.3
        panels[:, ::64] = 0.3
        panels = np.clip(panels + (noise - 0.5) * 0.08, 0, 1)
        # Five shared facade styles: places reuse them, so facades alone do not identify a place.
        self.styles = [
            _WallStyle(tint(brick, (0.62, 0.30, 0.22), 1.2), 3.0, 3.2, 3.4, 1.3, 1.8, (0.18, 0.22, 0.28), (0.85, 0.82, 0.75)),
            _WallStyle(tint(gravel, (0.80, 0.72, 0.58), 0.35), 4.0, 3.8, 3.3, 1.5, 1.9, (0.20, 0.24, 0.30), (0.35, 0.28, 0.22)),
            _WallStyle(tint(panels, (0.62, 0.62, 0.64), 1.0), 6.0, 3.0, 3.0, 2.2, 1.6, (0.22, 0.30, 0.38), (0.55, 0.55, 0.56)),
            _WallStyle(tint(brick, (0.75, 0.62, 0.35), 0.9), 3.0, 2.6, 3.2, 1.1, 1.7, (0.16, 0.18, 0.22), (0.95, 0.93, 0.88)),
            _WallStyle(tint(panels, (0.35, 0.48, 0.58), 0.6), 3.5, 1.8, 3.5, 1.6, 2.9, (0.30, 0.42, 0.55), (0.25, 0.28, 0.30)),
        ]
        self.sidewalk = tint(gravel, (0.62, 0.60, 0.57), 0.5)
        self.asphalt = tint(gravel, (0.30, 0.30, 0.31), 0.35)
        self.foliage = tint(grass, (0.22, 0.42, 0.16), 1.3)


# --------------------------------------------------------------------------------------------
# Places and cameras
# --------------------------------------------------------------------------------------------

@dataclass
class _Building:
    x0: float
    x1: float
    height: float
    style: int


@dataclass
class _Place:
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
    buildings: list[_Building]
    trees: list[float]  # tree x positions (m)

    @property
    def place_id(self) -> str:
        return f"{self.split}-{self.index:04d}"


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def _landmark_texture(assets: _Assets, rng: np.random.Generator, aspect: float) -> tuple[np.ndarray, np.ndarray]:
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
        crop = src[int(y0):int(y0 + ch), int(x0):int(x0 + cw)]
        if float(crop[::4, ::4].std()) > 0.12:
            break
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    th, tw = int(round(160 * aspect)), 160
    tex = _resize(crop, tw, th, Image.BICUBIC)
    if not use_color:
        import matplotlib

        cmap = matplotlib.colormaps[_COLORMAPS[int(rng.integers(len(_COLORMAPS)))]]
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


def _street(rng: np.random.Generator, n_styles: int) -> tuple[list[_Building], list[float]]:
    """A row of buildings spanning +-120 m around the landmark, and tree positions."""
    buildings, x = [], -120.0 - rng.uniform(0, 10)
    while x < 120:
        w = rng.uniform(7, 16)
        buildings.append(_Building(x, x + w, rng.uniform(8, 30), int(rng.integers(n_styles))))
        x += w + (rng.uniform(0.5, 3) if rng.random() < 0.3 else 0.0)
    trees = [float(t) for t in np.arange(-120, 120, rng.uniform(9, 14)) + rng.uniform(0, 5)]
    return buildings, trees


def _make_places(split: str, cfg: SyntheticCityConfig, assets: _Assets) -> list[_Place]:
    s = SPLITS.index(split)
    n = cfg.places_per_split[split]
    sizes = [SIZE_CLASSES[i % 3] for i in _rng(cfg.seed, s, 999).permutation(n)]
    # Few facade arrangements per split: several places share one street look exactly.
    n_arr = max(3, n // 4)
    arrangements = [_street(_rng(cfg.seed, s, 5000 + a), len(assets.styles)) for a in range(n_arr)]
    # Route: rows of 10 places along an east-west street, rows 80 m apart, one area per split.
    e0 = cfg.origin_easting + s * cfg.split_gap_m
    places = []
    for i in range(n):
        rng = _rng(cfg.seed, s, i, 0)
        row, col = divmod(i, 10)
        col = col if row % 2 == 0 else 9 - col  # serpentine route
        aspect = float(rng.uniform(0.6, 1.3))
        tex, alpha = _landmark_texture(assets, rng, aspect)
        w_m = float(rng.uniform(2.5, 3.5))
        buildings, trees = arrangements[int(rng.integers(n_arr))]
        places.append(_Place(
            split=split, index=i, size=sizes[i],
            easting=e0 + col * cfg.place_spacing_m, northing=cfg.origin_northing + row * 80.0,
            heading=180.0 if row % 2 == 0 else 0.0,  # even rows run east, odd rows west
            landmark=tex, landmark_alpha=alpha,
            frame_color=np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.15, 0.95)), np.float32),
            landmark_w=w_m, landmark_h=w_m * aspect, pedestal_h=float(rng.uniform(0.5, 1.4)),
            pedestal_color=np.array([rng.uniform(0.3, 0.8)] * 3, np.float32) * np.array([1, 0.97, 0.92], np.float32),
            gap=float(rng.uniform(5, 9)), buildings=buildings, trees=trees,
        ))
    return places


@dataclass
class _Camera:
    fraction: float  # landmark width / image width
    u_frac: float  # landmark centre, as a fraction of the width
    fov_deg: float
    horizon: float  # fraction of height
    condition: str
    along_m: float  # recorded-position offsets from the place centre (m)
    across_m: float


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = [c for c in CONDITIONS if weights.get(c, 0) > 0]
    p = np.array([weights[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _db_fraction(q_frac: float, k: int, size: str, near_up: bool) -> tuple[float, float]:
    """Landmark-fraction range of the k-th database view of a place whose first query shows ``q_frac``.

    Small landmarks are seen larger in the database, large ones smaller; for medium ones the near
    view goes either way and the far view is always smaller (which keeps every range in bounds).
    """
    lo, hi = _DB_SCALE_RATIOS[k % 2]
    up = {"small": True, "large": False}.get(size, near_up if k % 2 == 0 else False)
    a, b = (q_frac * lo, q_frac * hi) if up else (q_frac / hi, q_frac / lo)
    return max(a, _FRACTION_LIMITS[0]), max(min(b, _FRACTION_LIMITS[1]), _FRACTION_LIMITS[0])


def _camera(rng: np.random.Generator, fraction_range: tuple[float, float], condition: str,
            along: float) -> _Camera:
    frac = float(rng.uniform(*fraction_range))
    spread = max(0.0, 0.42 - frac / 2)  # keep the landmark inside the frame
    return _Camera(
        fraction=frac, u_frac=float(0.5 + rng.uniform(-spread, spread)),
        fov_deg=float(rng.uniform(55, 68)), horizon=float(rng.uniform(0.48, 0.58)),
        condition=condition,
        along_m=float(along + rng.uniform(-1, 1)), across_m=float(rng.uniform(-1.5, 1.5)),
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _tile(tex: np.ndarray, px_per_tile: float, ox: float, oy: float, w: int, h: int) -> np.ndarray:
    """A (h, w) window of ``tex`` tiled at ``px_per_tile`` pixels per tile, starting at (ox, oy) px."""
    s = max(int(round(px_per_tile)), 2)
    t = _resize(tex, s, s) if s != tex.shape[0] else tex
    ox, oy = int(ox) % s, int(oy) % s
    reps_y, reps_x = (h + oy) // s + 2, (w + ox) // s + 2
    big = np.tile(t, (reps_y, reps_x, 1))
    return big[oy:oy + h, ox:ox + w]


def _render(place: _Place, cam: _Camera, assets: _Assets, H: int, W: int,
            rng: np.random.Generator) -> np.ndarray:
    """One view as a float RGB (H, W, 3) image with its illumination applied."""
    f = W / (2 * math.tan(math.radians(cam.fov_deg) / 2))
    cx, yh = W / 2, cam.horizon * H
    z_l = f * place.landmark_w / (cam.fraction * W)  # landmark depth giving the wanted size
    z_f = z_l + place.gap
    x_c = -(cam.u_frac * W - cx) * z_l / f  # camera x so the landmark lands at u_frac
    night, dusk = cam.condition == "night", cam.condition == "dusk"

    img = np.zeros((H, W, 3), np.float32)
    emit = np.zeros((H, W), np.float32)  # 1 where a pixel emits its own light (sky, lit windows)
    spot = np.zeros((H, W), np.float32)  # the landmark (floodlit at night)
    vv = np.arange(H, dtype=np.float32)[:, None]
    uu = np.arange(W, dtype=np.float32)[None, :]

    def u_of(x: float, z: float) -> float:
        return cx + f * (x - x_c) / z

    def v_of(y: float, z: float) -> float:  # y: height above ground (m)
        return yh + f * (_CAMERA_HEIGHT_M - y) / z

    # Sky (emissive, coloured per condition)
    t = np.clip(vv / max(yh, 1), 0, 1)[..., None]
    top, bottom = {"day": ((0.35, 0.55, 0.85), (0.75, 0.85, 0.95)),
                   "dusk": ((0.25, 0.22, 0.45), (0.98, 0.60, 0.35)),
                   "night": ((0.01, 0.02, 0.06), (0.06, 0.07, 0.12))}[cam.condition]
    img[:] = np.array(top, np.float32) * (1 - t) + np.array(bottom, np.float32) * t
    emit[:] = 1.0

    # Ground: sidewalk up to the curb in front of the landmark, road nearer the camera
    gy = vv[:, 0] - yh
    z_row = np.where(gy > 0, f * _CAMERA_HEIGHT_M / np.maximum(gy, 1e-3), np.inf)
    z_curb = max(z_l - 1.2, 0.5)
    v_fb = int(math.ceil(v_of(0, z_f)))
    rows = np.arange(H)
    ground = rows >= max(v_fb, 0)
    if ground.any():
        side = _tile(assets.sidewalk, f / z_l * 1.2, -x_c * f / z_l, 0, W, H)
        road = _tile(assets.asphalt, f / max(z_curb, 1) * 2.0, -x_c * f / z_l, 0, W, H)
        is_road = (z_row < z_curb)[:, None]
        g = np.where(is_road[..., None], road, side)
        curb = (np.abs(z_row - z_curb) < 0.012 * z_curb + 0.06)[:, None]  # a light kerb stone line
        g = np.where(curb[..., None], 0.7, g)
        # dashed lane marking 3 m in front of the curb
        z_lane = z_curb - 3.5
        if z_lane > 0.8:
            lane_rows = np.abs(z_row - z_lane) < 0.04 * z_lane + 0.05
            xw = x_c + (uu - cx) * z_lane / f
            dash = (np.mod(xw, 6.0) < 3.0)
            g = np.where((lane_rows[:, None] & dash)[..., None], np.array([0.85, 0.8, 0.5], np.float32), g)
        img[ground] = g[ground]
        emit[ground] = 0

    # Facades
    for b in place.buildings:
        u0, u1 = u_of(b.x0, z_f), u_of(b.x1, z_f)
        if u1 < 0 or u0 > W:
            continue
        st = assets.styles[b.style]
        ppm = f / z_f
        top_v = v_of(b.height, z_f)
        a, c = int(max(math.floor(u0), 0)), int(min(math.ceil(u1), W))
        r0, r1 = int(max(math.floor(top_v), 0)), int(min(v_fb, H))
        if c <= a or r1 <= r0:
            continue
        wall = _tile(st.texture, st.tile_m * ppm, a - u0, r0 - top_v, c - a, r1 - r0).copy()
        emit[r0:r1, a:c] = 0  # lit windows below set their own emission
        # windows on a world-aligned grid (ground floor left blank for shop fronts)
        xs = np.arange(b.x0 + st.win_dx / 2, b.x1 - st.win_w / 2, st.win_dx)
        ys = np.arange(3.5, b.height - 1.5, st.win_dy)
        for xw in xs:
            wu0, wu1 = u_of(xw - st.win_w / 2, z_f) - a, u_of(xw + st.win_w / 2, z_f) - a
            if wu1 < 0 or wu0 > c - a:
                continue
            for yw in ys:
                wv0, wv1 = v_of(yw + st.win_h, z_f) - r0, v_of(yw, z_f) - r0
                i0, i1 = int(max(round(wv0), 0)), int(min(round(wv1), r1 - r0))
                j0, j1 = int(max(round(wu0), 0)), int(min(round(wu1), c - a))
                if i1 <= i0 or j1 <= j0:
                    continue
                fr = max(int(ppm * 0.12), 1) if ppm > 6 else 0
                wall[max(i0 - fr, 0):i1 + fr, max(j0 - fr, 0):j1 + fr] = st.frame
                lit = night and rng.random() < 0.45 or dusk and rng.random() < 0.15
                if lit:
                    wall[i0:i1, j0:j1] = np.array([1.0, 0.82, 0.45], np.float32) * rng.uniform(0.7, 1.0)
                    emit[r0 + i0:r0 + i1, a + j0:a + j1] = 1.0
                else:
                    grad = np.linspace(1.15, 0.8, i1 - i0, dtype=np.float32)[:, None, None]
                    wall[i0:i1, j0:j1] = np.array(st.glass, np.float32) * grad
        # cornice and a shop-front band
        corn = max(int(ppm * 0.5), 1)
        if top_v >= 0:
            wall[: corn] *= 0.6
        shop_top = int(round(v_of(3.0, z_f))) - r0
        if 0 <= shop_top < r1 - r0:
            wall[shop_top:shop_top + max(int(ppm * 0.4), 1)] *= 0.5
            lower = wall[shop_top + max(int(ppm * 0.4), 1):]
            lower *= 0.75
        wall[:, : max(int(ppm * 0.15), 1)] *= 0.55  # building edge
        img[r0:r1, a:c] = wall

    # Trees and lamp posts on the sidewalk, 2 m in front of the facades
    z_t = z_f - 2.0
    for i, xt in enumerate(place.trees):
        ut = u_of(xt, z_t)
        if ut < -f * 3 / z_t or ut > W + f * 3 / z_t:
            continue
        ppm = f / z_t
        trunk_w = max(ppm * 0.3, 1)
        vb, vt = v_of(0, z_t), v_of(2.5, z_t)
        img[max(int(vt), 0):max(min(int(vb), H), 0),
            max(int(ut - trunk_w / 2), 0):max(min(int(ut + trunk_w / 2) + 1, W), 0)] = (0.25, 0.18, 0.12)
        if i % 2 == 0:  # crown
            r = 2.2 * ppm
            cy = v_of(4.3, z_t)
            d = ((uu - ut) / r) ** 2 + ((vv - cy) / (r * 0.9)) ** 2
            m = d < 1
            if m.any():
                leaves = _tile(assets.foliage, 2.5 * ppm, ut, cy, W, H)
                img[m] = leaves[m] * (1.1 - 0.4 * np.sqrt(d[m]))[:, None]
                emit[m] = 0
        else:  # lamp post
            vt = v_of(5.0, z_t)
            img[max(int(vt), 0):max(min(int(vb), H), 0),
                max(int(ut - trunk_w / 3), 0):max(min(int(ut + trunk_w / 3) + 1, W), 0)] = (0.15, 0.15, 0.16)
            if night or dusk:
                d2 = (uu - ut) ** 2 + (vv - vt) ** 2
                glow = np.exp(-d2 / (2 * (0.6 * ppm) ** 2)).astype(np.float32)
                img += glow[..., None] * np.array([1.0, 0.85, 0.55], np.float32) * (1.0 if night else 0.5)
                emit = np.maximum(emit, glow)

    # Landmark: pedestal + framed panel
    ppm = f / z_l
    ul = u_of(0, z_l)
    pw, ph = place.landmark_w * ppm, place.landmark_h * ppm
    v_base = v_of(0, z_l)
    v_pb = v_of(place.pedestal_h, z_l)
    pedw = pw * 0.35
    pa, pc = int(round(ul - pedw / 2)), int(round(ul + pedw / 2))
    pr0, pr1 = int(round(v_pb)), int(round(v_base))
    if pc > 0 and pa < W and pr1 > 0 and pr0 < H:
        sl = (slice(max(pr0, 0), min(pr1, H)), slice(max(pa, 0), min(pc, W)))
        shade = np.linspace(1.0, 0.7, max(pc - pa, 1), dtype=np.float32)[max(-pa, 0):max(-pa, 0) + sl[1].stop - sl[1].start]
        img[sl] = place.pedestal_color * shade[None, :, None]
        emit[sl] = 0
        spot[sl] = 1
    border = 0.06
    fw, fh = int(round(pw * (1 + 2 * border))), int(round(ph + pw * 2 * border))
    if fw >= 2 and fh >= 2:
        tex = _resize(place.landmark, max(int(round(pw)), 1), max(int(round(ph)), 1), Image.BILINEAR)
        alpha_src = Image.fromarray((place.landmark_alpha * 255).astype(np.uint8))
        panel = np.empty((fh, fw, 3), np.float32)
        panel[:] = place.frame_color
        ox, oy = (fw - tex.shape[1]) // 2, (fh - tex.shape[0]) // 2
        panel[oy:oy + tex.shape[0], ox:ox + tex.shape[1]] = tex
        alpha = np.asarray(alpha_src.resize((fw, fh), Image.BILINEAR), np.float32) / 255.0
        x0, y0 = int(round(ul - fw / 2)), int(round(v_pb - fh))
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + fw, W), min(y0 + fh, H)
        if xb > xa and yb > ya:
            p = panel[ya - y0:yb - y0, xa - x0:xb - x0]
            al = alpha[ya - y0:yb - y0, xa - x0:xb - x0, None]
            img[ya:yb, xa:xb] = img[ya:yb, xa:xb] * (1 - al) + p * al
            emit[ya:yb, xa:xb] *= 1 - al[..., 0]
            spot[ya:yb, xa:xb] = np.maximum(spot[ya:yb, xa:xb], al[..., 0])

    # A parked car in front of the curb, sometimes occluding the landmark's base
    if z_curb > 5.0 and rng.random() < 0.5:
        z_car = rng.uniform(max(z_curb - 2.5, 4.5), z_curb - 0.5)
        ppm_c = f / z_car
        xcar = x_c + (rng.uniform(0.1, 0.9) * W - cx) * z_car / f
        u0, u1 = u_of(xcar - 2.2, z_car), u_of(xcar + 2.2, z_car)
        vb, vm, vt = v_of(0.25, z_car), v_of(0.9, z_car), v_of(1.45, z_car)
        col = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.9), rng.uniform(0.2, 0.9)), np.float32)
        a, c = int(max(u0, 0)), int(min(u1, W))
        if c > a:
            img[int(max(vm, 0)):int(min(vb, H)), a:c] = col
            ga, gc = int(max(u0 + 0.18 * (u1 - u0), 0)), int(min(u1 - 0.18 * (u1 - u0), W))
            if gc > ga:
                img[int(max(vt, 0)):int(max(min(vm, H), 0)), ga:gc] = col * 0.35 + 0.08
            for wx in (u0 + 0.2 * (u1 - u0), u0 + 0.8 * (u1 - u0)):
                d = ((uu - wx) / (0.33 * ppm_c)) ** 2 + ((vv - vb) / (0.33 * ppm_c)) ** 2
                img[d < 1] = 0.05
            emit[int(max(vt, 0)):int(min(v_of(0, z_car), H)), a:c] = 0
            spot[int(max(vt, 0)):int(min(v_of(0, z_car), H)), a:c] = 0

    return _illuminate(img, emit, spot, cam.condition, rng)


def _illuminate(img: np.ndarray, emit: np.ndarray, spot: np.ndarray, condition: str,
                rng: np.random.Generator) -> np.ndarray:
    """Apply the condition's light to the reflective parts; emitters keep their own colour."""
    if condition == "day":
        light = np.array([1, 1, 1], np.float32) * rng.uniform(0.9, 1.1) * np.array([1, 1, rng.uniform(0.95, 1.05)], np.float32)
        lit = img * light
        spot_gain = 0.0
    elif condition == "dusk":
        light = np.array([1.0, 0.78, 0.60], np.float32) * rng.uniform(0.45, 0.6)
        lit = img * light
        spot_gain = 0.15
    else:
        light = np.array([0.70, 0.80, 1.05], np.float32) * rng.uniform(0.15, 0.22)
        lit = img * light
        spot_gain = rng.uniform(0.30, 0.45)  # the landmark is floodlit
    lit = lit + img * spot[..., None] * spot_gain * np.array([1.0, 0.93, 0.8], np.float32)
    return np.clip(lit * (1 - emit[..., None]) + img * emit[..., None], 0, 1)


def _perspective_coeffs(src_quad: np.ndarray, w: int, h: int) -> list[float]:
    """PIL PERSPECTIVE coefficients mapping output corners onto ``src_quad`` (input points)."""
    dst = np.array([[0, 0], [w, 0], [w, h], [0, h]], float)
    A, b = [], []
    for (x, y), (X, Y) in zip(dst, src_quad):
        A.append([x, y, 1, 0, 0, 0, -X * x, -X * y])
        b.append(X)
        A.append([0, 0, 0, x, y, 1, -Y * x, -Y * y])
        b.append(Y)
    return [float(c) for c in np.linalg.solve(np.array(A), np.array(b))]


def _finish(img: np.ndarray, condition: str, rng: np.random.Generator) -> Image.Image:
    """Camera effects: slight perspective (viewpoint), blur, sensor noise."""
    H, W = img.shape[:2]
    pil = Image.fromarray((img * 255 + 0.5).astype(np.uint8))
    # Corners moved inward by up to 5 %: a small keystone/rotation without empty borders.
    m = rng.uniform(0, 0.05, size=(4, 2)) * np.array([W, H])
    quad = np.array([[0, 0], [W, 0], [W, H], [0, H]], float) + m * np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    pil = pil.transform((W, H), Image.PERSPECTIVE, _perspective_coeffs(quad, W, H), Image.BILINEAR)
    pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    out = np.asarray(pil, np.float32) / 255.0
    sigma = {"day": 0.01, "dusk": 0.02, "night": 0.035}[condition]
    out = out + rng.normal(0, sigma, out.shape).astype(np.float32)
    if condition == "night":  # shot noise is worse in the dark: a little chroma noise
        out = out + rng.normal(0, sigma / 2, (H, W, 1)).astype(np.float32)
    return Image.fromarray((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Writing the dataset
# --------------------------------------------------------------------------------------------

def at_name(easting: float, northing: float, zone: int, letter: str, pano: str = "", heading: float | None = None,
            pitch: float | None = None, height: float | None = None, timestamp: str = "", note: str = "") -> str:
    """A file name in the '@' layout, lat/lon filled from the UTM position."""
    lat, lon = utm.to_latlon(easting, northing, zone, letter)
    fields = [f"{easting:.2f}", f"{northing:.2f}", str(zone), letter, f"{lat:.6f}", f"{lon:.6f}", pano, "",
              "" if heading is None else f"{heading:.1f}", "" if pitch is None else f"{pitch:.1f}", "",
              "" if height is None else f"{height:.1f}", timestamp, note]
    for v in fields:
        if "@" in v or "/" in v:
            raise ValueError(f"'@' field may not contain '@' or '/': {v!r}")
    return "@" + "@".join(fields) + "@.jpg"


def _write_split(root: Path, split: str, cfg: SyntheticCityConfig, assets: _Assets, pbar: Any) -> dict[str, list]:
    """Render and save one split; return its meta.json entries."""
    s = SPLITS.index(split)
    entries: dict[str, list] = {"database": [], "queries": []}
    for kind in entries:
        (root / "images" / split / kind).mkdir(parents=True, exist_ok=True)
    for place in _make_places(split, cfg, assets):
        near_up = bool(_rng(cfg.seed, s, place.index, 1).random() < 0.5)
        dir_sign = 1 if place.heading == 180.0 else -1  # +1: the route runs east here
        # Queries within 3 m of the centre, db images 1..5 m along the street: <= 8.5 m apart.
        q_rngs = [_rng(cfg.seed, s, place.index, 3, k) for k in range(cfg.queries_per_place)]
        q_cams = [_camera(r, _QUERY_FRACTION[place.size], _pick(r, cfg.query_conditions), r.uniform(-2.0, 2.0))
                  for r in q_rngs]
        for k in range(cfg.db_per_place):
            rng = _rng(cfg.seed, s, place.index, 2, k)
            side = -1 if k % 2 == 0 else 1
            cam = _camera(rng, _db_fraction(q_cams[0].fraction, k, place.size, near_up),
                          _pick(rng, cfg.db_conditions), side * rng.uniform(2.0, 4.0))
            entries["database"].append(_emit_image(root, split, "database", place, cam, k, dir_sign, cfg, assets, rng))
            pbar.update(1)
        for k, (rng, cam) in enumerate(zip(q_rngs, q_cams)):
            entries["queries"].append(_emit_image(root, split, "queries", place, cam, k, dir_sign, cfg, assets, rng))
            pbar.update(1)
    return entries


def _emit_image(root: Path, split: str, kind: str, place: _Place, cam: _Camera, k: int, dir_sign: int,
                cfg: SyntheticCityConfig, assets: _Assets, rng: np.random.Generator) -> dict[str, Any]:
    H, W = cfg.image_size
    img = _finish(_render(place, cam, assets, H, W, rng), cam.condition, rng)
    east = place.easting + dir_sign * cam.along_m
    north = place.northing + cam.across_m
    role = "d" if kind == "database" else "q"
    date = "20210615" if kind == "database" else "20220110"
    name = at_name(east, north, cfg.utm_zone, cfg.utm_letter, pano=f"{place.place_id}{role}{k}",
                   heading=place.heading, pitch=0.0, height=_CAMERA_HEIGHT_M,
                   timestamp=date + _TIMESTAMP[cam.condition],
                   note=f"size-{place.size}" if kind == "queries" else "")
    rel = f"images/{split}/{kind}/{name}"
    img.save(root / rel, format="JPEG", quality=cfg.jpeg_quality)
    entry = {"file": rel, "place": place.place_id, "condition": cam.condition,
             "landmark_fraction": round(cam.fraction, 4), "easting": round(east, 2), "northing": round(north, 2)}
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
        raise HaflocError(f"{root}: exists and is not a synthetic city (no generator {META_NAME}); choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        assets = _Assets()
        splits = [s for s in SPLITS if s in cfg.places_per_split]
        total = sum(cfg.places_per_split[s] for s in splits) * (cfg.db_per_place + cfg.queries_per_place)
        out: dict[str, Any] = {"generator": GENERATOR, "version": FORMAT_VERSION,
                               "config": cfg.to_json(), "splits": {}}
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


def read_meta(root: str | Path) -> dict[str, Any]:
    """The generator's ``meta.json`` of ``root`` (raises InputError if missing or malformed)."""
    path = Path(root) / META_NAME
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "missing: not a synthetic city folder") from None
    except (OSError, ValueError) as e:
        raise InputError(path, f"unreadable ({e})") from None
    if not isinstance(meta, dict) or "splits" not in meta:
        raise InputError(path, "no 'splits' entry: not a synthetic city meta file")
    return meta


def size_classes(root: str | Path) -> dict[str, str]:
    """Query file (relative to ``root``, e.g. ``images/test/queries/@...@.jpg``) -> size class."""
    meta = read_meta(root)
    return {q["file"]: q["size"] for split in meta["splits"].values() for q in split.get("queries", [])}

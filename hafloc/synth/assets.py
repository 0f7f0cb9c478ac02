"""Textures of the synthetic city: scikit-image's bundled photos, loaded once per generation.

Nothing is downloaded: a sample that would need a download is left out (noise stands in).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

_COLOR_SOURCES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "logo",
)
_GRAY_SOURCES = ("camera", "coins", "moon", "page", "text", "clock", "cell", "horse")
COLORMAPS = (
    "viridis",
    "plasma",
    "magma",
    "cividis",
    "twilight",
    "turbo",
    "copper",
    "spring",
    "cool",
    "autumn",
    "ocean",
    "terrain",
)


def to_float_rgb(img: np.ndarray) -> np.ndarray:
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


def resize(img: np.ndarray, w: int, h: int, resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Resize a float RGB array (via 8-bit Pillow: fast and deterministic)."""
    pil = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.asarray(pil.resize((max(w, 1), max(h, 1)), resample), dtype=np.float32) / 255.0


@dataclass
class WallStyle:
    texture: np.ndarray  # (S, S, 3) float, one tile covering tile_m metres
    tile_m: float
    win_dx: float  # window pitch (m)
    win_dy: float
    win_w: float  # window size (m)
    win_h: float
    glass: tuple[float, float, float]
    frame: tuple[float, float, float]


class Assets:
    """Source photos, wall styles and the ground texture."""

    def __init__(self) -> None:
        import skimage.data as skd  # heavy import, only when generating

        def load(name: str) -> np.ndarray | None:
            try:
                return to_float_rgb(getattr(skd, name)())
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
            t = resize(tex, 256, 256)
            t = (t - t.mean()) * contrast + 0.5
            return np.clip(t * np.array(rgb, np.float32) * 1.6, 0, 1)

        panels = np.full((256, 256, 3), 0.5, np.float32)
        panels[::64, :] = 0.3
        panels[:, ::64] = 0.3
        panels = np.clip(panels + (noise - 0.5) * 0.08, 0, 1)
        # Five shared facade styles: places reuse them, so facades alone do not identify a place.
        self.styles = [
            WallStyle(
                tint(brick, (0.62, 0.30, 0.22), 1.2), 3.0, 3.2, 3.4, 1.3, 1.8, (0.18, 0.22, 0.28), (0.85, 0.82, 0.75)
            ),
            WallStyle(
                tint(gravel, (0.80, 0.72, 0.58), 0.35), 4.0, 3.8, 3.3, 1.5, 1.9, (0.20, 0.24, 0.30), (0.35, 0.28, 0.22)
            ),
            WallStyle(
                tint(panels, (0.62, 0.62, 0.64), 1.0), 6.0, 3.0, 3.0, 2.2, 1.6, (0.22, 0.30, 0.38), (0.55, 0.55, 0.56)
            ),
            WallStyle(
                tint(brick, (0.75, 0.62, 0.35), 0.9), 3.0, 2.6, 3.2, 1.1, 1.7, (0.16, 0.18, 0.22), (0.95, 0.93, 0.88)
            ),
            WallStyle(
                tint(panels, (0.35, 0.48, 0.58), 0.6), 3.5, 1.8, 3.5, 1.6, 2.9, (0.30, 0.42, 0.55), (0.25, 0.28, 0.30)
            ),
        ]
        self.sidewalk = tint(gravel, (0.62, 0.60, 0.57), 0.5)
        self.asphalt = tint(gravel, (0.30, 0.30, 0.31), 0.35)
        self.foliage = tint(grass, (0.22, 0.42, 0.16), 1.3)

"""What the synthetic city generator makes: its settings and the constants of its world."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from hafloc.configs import from_mapping
from hafloc.datasets.atfolders import SPLITS
from hafloc.datasets.synthetic import CONDITIONS, FORMAT_VERSION, GENERATOR, META_NAME, SIZE_CLASSES

__all__ = ["SyntheticCityConfig", "SPLITS", "SIZE_CLASSES", "CONDITIONS", "META_NAME", "FORMAT_VERSION", "GENERATOR"]

# Landmark width as a fraction of the image width, per class (query) and per database option.
QUERY_FRACTION = {"small": (0.05, 0.10), "medium": (0.20, 0.30), "large": (0.50, 0.65)}
# Database views change the landmark's scale by these factors (the first is the "near" view that
# an ImageNet CNN can still match; the second makes a small landmark large and vice versa).
DB_SCALE_RATIOS = ((1.25, 1.6), (2.5, 4.0))
FRACTION_LIMITS = (0.05, 0.65)
TIMESTAMP = {"day": "1200", "dusk": "1930", "night": "2300"}
CAMERA_HEIGHT_M = 1.6


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
        cfg = from_mapping(cls, data, what="synthetic city setting")
        h, w = cfg.image_size  # JSON gives a list
        return replace(cfg, image_size=(h, w))

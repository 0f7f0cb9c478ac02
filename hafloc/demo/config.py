"""DemoConfig: every setting of a ``hafloc demo`` run (written to ``DIR/config.json``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import HaflocError
from ..heads import METHODS
from ..synth import SyntheticCityConfig

# every registered method except SuperPoint (its own backbone and weights; opt-in with --methods)
DEMO_METHODS = tuple(m for m in METHODS if m != "superpoint")


@dataclass
class DemoConfig:
    """What the demo builds. ``create(quick=...)`` gives the two sizes the README promises.

    Budgets are in epochs (the same training on any machine, for any seed), sized for a 2-core
    CPU with the frozen-trunk cache (train/trunk_cache.py; measured epochs 2.1x (HAF) to 3.1x
    (NetVLAD) faster at 128x160, about 6x for HAF at 256x320): the full run (12 epochs at the
    synthetic city's native 256x320, about the 2 min per method in which the former time budget
    bought 4-5) took 9 min 12 s in all on an idle 2-core machine, ``--quick`` (128x160, 10 epochs
    instead of 4) 72 s.
    """

    output: str = "hafloc-demo"
    quick: bool = False
    seed: int = 0
    seeds: int = 1  # training runs per method (seeds seed, seed+1, ...): the report shows their spread
    methods: tuple[str, ...] = DEMO_METHODS
    image_size: tuple[int, int] = (256, 320)  # (H, W) for training, tuning and extraction
    clusters: int = 32  # VLAD clusters per level
    proj_dim: int = 128  # HAF: channels per level after the 1x1 projection
    train_minutes: float | None = None  # optional wall-clock cap per method (None: the epochs alone)
    fit_images: int = 60  # images whose local features initialise the clusters (k-means): enough for 32
    epochs: int = 12  # the training budget per method (--quick: 10)
    batch_size: int = 4
    num_negatives: int = 5
    cache_refresh: int = 60  # one descriptor refresh per epoch of the demo's 60 training queries
    neg_pool: int = 200
    lr: float = 1e-4
    head_lr: float = 1e-3  # the freshly initialised head learns faster than the pretrained trunk
    train_stages: int = 1
    tune_step: float = 0.1  # grid step on the simplex of fusion weights (paper: Table 2)
    backend: str = "auto"  # extraction engine: ONNX Runtime when installed
    num_examples: int = 5  # example queries shown with their retrievals
    top_k: int = 5
    city: dict[str, Any] = field(default_factory=lambda: SyntheticCityConfig().to_json())
    progress: bool = True

    def __post_init__(self) -> None:
        # JSON and the command line hand lists: keep the declared tuples
        h, w = self.image_size
        self.image_size = (int(h), int(w))
        self.methods = tuple(self.methods)

    @classmethod
    def create(
        cls,
        output: str = "hafloc-demo",
        quick: bool = False,
        seed: int = 0,
        methods: tuple[str, ...] | list[str] | None = None,
        **overrides: Any,
    ) -> "DemoConfig":
        """The full or quick preset for ``output``, with ``overrides`` applied."""
        city = SyntheticCityConfig.quick(seed=seed) if quick else SyntheticCityConfig(seed=seed)
        base: dict[str, Any] = dict(output=str(output), quick=quick, seed=seed, city=city.to_json())
        if quick:
            # torch backend: for ~45 test images an ONNX export per model costs more than it saves
            base.update(
                image_size=(128, 160),
                clusters=16,
                proj_dim=64,
                epochs=10,
                cache_refresh=20,
                neg_pool=100,
                backend="torch",
            )
        if methods is not None:
            base["methods"] = tuple(methods)
        base.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**base)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not self.methods:
            raise HaflocError("the demo needs at least one method")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise HaflocError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise HaflocError(f"a method is listed twice: {', '.join(self.methods)}")
        h, w = self.image_size
        if h % 32 or w % 32:
            raise HaflocError(f"image size must be multiples of 32, got {h}x{w}")
        if self.seeds < 1:
            raise HaflocError(f"seeds must be >= 1, got {self.seeds}")
        if (self.train_minutes is not None and self.train_minutes <= 0) or self.epochs < 1:
            raise HaflocError("train_minutes must be > 0 (or none) and epochs >= 1")
        n = round(1 / self.tune_step)
        if n < 1 or abs(n * self.tune_step - 1) > 1e-9:
            raise HaflocError(f"tune_step must divide 1 (e.g. 0.1), got {self.tune_step}")
        self.city_config().validate()

    def city_config(self) -> SyntheticCityConfig:
        return SyntheticCityConfig.from_json(dict(self.city))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        d["methods"] = list(self.methods)
        return json.loads(json.dumps(d))


def digest(obj: Any) -> str:
    """Stable short hash of JSON-able data: identifies a stage's inputs (finished-stage checks)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

"""TrainConfig: every setting of a training run (saved as ``config.json`` beside its outputs)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HaflocError, InputError
from ..fileio import write_json_atomic
from ..heads import METHODS, head_config
from ..images.io import target_size

log = logging.getLogger(__name__)

SUPERVISIONS = ("auto", "gps", "labels")
OPTIMIZERS = ("adam", "sgd")


def parse_image_size(text: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """'224x320' (H x W) -> (224, 320); sides that are not multiples of 32 are rounded to the
    nearest one (as extraction does, ``images.io.target_size``) with a one-line note."""
    if isinstance(text, (tuple, list)):
        h, w = (int(v) for v in text)
    else:
        try:
            h, w = (int(v) for v in str(text).lower().replace("*", "x").split("x"))
        except ValueError:
            raise HaflocError(f"image size must look like 224x320 (height x width), got {text!r}") from None
    if h < 1 or w < 1:
        raise HaflocError(f"image size sides must be positive, got {h}x{w}")
    rh, rw = target_size(w, h, max_side=None)
    if (rh, rw) != (h, w):
        log.info("image size %dx%d rounded to %dx%d (the networks need sides that are multiples of 32)", h, w, rh, rw)
    return rh, rw


@dataclass
class TrainConfig:
    """A training run. Defaults follow NetVLAD's weakly supervised recipe, scaled for CPU."""

    method: str = "haf"
    dataset: str = ""
    output: str = ""
    format: str | None = None  # dataset layout (None: detected)
    epochs: int = 5
    image_size: tuple[int, int] = (224, 320)  # (H, W), fixed for training, caching and validation
    # model
    backbone: str | None = None
    backbone_weights: str | None = None
    clusters: int | None = None  # VLAD clusters per level (None: the method's default, 64)
    proj_dim: int | None = None
    levels: tuple[str, ...] | None = None  # VLAD heads: backbone levels to use (None: the method's)
    attention: bool | None = None  # VLAD heads: attention masks on/off (None: the method's)
    fit_images: int = 300  # at most this many training images for k-means / PCA init
    train_stages: int = 1  # last n backbone stages trainable; the rest frozen (BN in eval)
    dim: int | None = None  # PCA whitening fitted at the end (None: none)
    whitening_images: int = 10_000
    # supervision and mining
    supervision: str = "auto"  # gps | labels | auto (what the dataset has; positions first)
    pos_radius: float = 10.0
    neg_radius: float = 25.0
    num_negatives: int = 5
    neg_pool: int = 1000  # random negatives per query per round (plus last round's hardest)
    cache_refresh: int = 250  # queries between refreshes of the cached descriptors
    max_queries_per_epoch: int | None = None
    val_fraction: float = 0.2  # for label/position sets without a val split
    # optimisation
    loss: str | None = None  # None: dd for haf, triplet for the baselines
    margin: float | None = None  # None: the loss's default (0.1)
    optimizer: str = "adam"
    lr: float = 1e-4
    head_lr: float | None = None  # None: lr; VLAD heads often like 10x the backbone's
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 4  # tuples per iteration (across all ranks)
    patience: int = 5  # epochs without val recall@5 improvement before stopping (0: never)
    seed: int = 0
    checkpoint_every: int = 100  # iterations (rounded up to a cache refresh, see loop.py)
    time_budget: float | None = None  # minutes of wall clock for the whole run
    # data loading
    workers: int = 2
    cache_images: str = "auto"  # auto | yes | no: keep decoded images in memory
    cache_limit: int = 3000  # 'auto' caches when the set has at most this many images (at 224x320)
    eval_batch_size: int = 16
    max_val_queries: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.image_size = parse_image_size(self.image_size)
        if self.levels is not None:
            self.levels = tuple(self.levels)

    def head_overrides(self) -> dict[str, Any]:
        """The head settings this run changes (``ModelConfig.for_method`` keywords)."""
        return {"num_clusters": self.clusters, "proj_dim": self.proj_dim, "levels": self.levels,
                "attention": self.attention}

    def validate(self) -> None:
        if self.method not in METHODS:
            raise HaflocError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.supervision not in SUPERVISIONS:
            raise HaflocError(f"supervision must be one of {SUPERVISIONS}, got {self.supervision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise HaflocError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.cache_images not in ("auto", "yes", "no"):
            raise HaflocError(f"cache_images must be auto, yes or no, got {self.cache_images!r}")
        for name in ("epochs", "batch_size", "num_negatives", "neg_pool", "cache_refresh", "checkpoint_every",
                     "workers", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise HaflocError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_stages < 0:
            raise HaflocError("train_stages must be >= 0")
        head_config(self.method, **self.head_overrides())  # levels / attention the method cannot take
        if not self.dataset:
            raise HaflocError("no dataset given")
        if not self.output:
            raise HaflocError("no output folder given")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        if self.levels is not None:
            d["levels"] = list(self.levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise HaflocError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(path, "config file not found") from None
        except (OSError, ValueError) as err:
            raise InputError(path, f"not a readable JSON config ({err})") from None
        if not isinstance(data, dict):
            raise InputError(path, "config must be a JSON object")
        try:
            return cls.from_dict(data)
        except (HaflocError, TypeError) as err:
            raise InputError(path, str(err)) from None

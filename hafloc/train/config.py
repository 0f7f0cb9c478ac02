"""TrainConfig: every setting of a training run (saved as ``config.json`` beside its outputs)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..configs import comma_list, from_mapping, on_off, setting
from ..errors import HaflocError, InputError
from ..fileio import write_json_atomic
from ..heads import METHODS, head_config
from ..images.io import target_size

log = logging.getLogger(__name__)

SUPERVISIONS = ("auto", "gps", "labels")
OPTIMIZERS = ("adam", "sgd")
TRUNK_CACHE = ("float16", "float32", "no")
SELECT = ("recall@5", "recall@1", "recall@1+5")


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

    # Fields with a help text are also flags of `hafloc train` (cli/train.py builds them from here;
    # the default is appended to the help unless it is None, in which case the help says what None means).
    method: str = setting("haf", "haf (the paper) or a baseline: " + ", ".join(m for m in METHODS if m != "haf"))
    dataset: str = setting(
        "",
        "dataset folder or ground-truth file (any layout 'hafloc eval' reads); several, comma-separated, "
        "train together and are validated each (best model: mean val recall@5, none below its start)",
    )
    output: str = setting("", "output folder: best.model, last.ckpt, history.csv/png, config.json")
    format: str | None = setting(None, "dataset layout (default: detected)")
    epochs: int = setting(5, "epochs")
    # (H, W), fixed for training, caching and validation
    image_size: tuple[int, int] = setting((224, 320), "training image size HxW; rounded to multiples of 32")
    # model
    backbone: str | None = setting(None, "efficientnet-lite0 (default), efficientnet-lite2 or vgg16")
    backbone_weights: str | None = setting(None, "backbone state-dict file (vgg16, superpoint)")
    clusters: int | None = setting(None, "VLAD clusters per level (default: the method's, 64)")
    proj_dim: int | None = setting(None, "HAF: channels per level after the 1x1 projection (default 128)")
    levels: tuple[str, ...] | None = setting(
        None,
        "VLAD heads: comma-separated levels of low,mid,high (default: the method's; HAF all three)",
        parse=comma_list,
    )
    attention: bool | None = setting(
        None, "VLAD heads: attention masks on or off (default: the method's)", parse=on_off
    )
    fit_images: int = setting(300, "at most this many training images for the cluster init (k-means / PCA)")
    # last n backbone stages trainable; the rest frozen (BN in eval)
    train_stages: int = setting(1, "trainable backbone stages, counted from the top")
    dim: int | None = setting(None, "fit PCA whitening to this dimension at the end (default: none)")
    whitening_images: int = 10_000
    # supervision and mining
    supervision: str = setting("auto", "auto (what the dataset has; positions first), gps (10 m / 25 m) or labels")
    pos_radius: float = 10.0
    neg_radius: float = 25.0
    num_negatives: int = setting(5, "negatives per tuple")
    # random negatives per query per round (plus last round's hardest)
    neg_pool: int = setting(1000, "random negatives scored per query and round")
    cache_refresh: int = setting(250, "queries between refreshes of the cached descriptors")
    max_queries_per_epoch: int | None = setting(None, "cap on training queries per epoch (default: none)")
    val_fraction: float = setting(0.2, "held-out part of the database for sets without a val split")
    # optimisation
    loss: str | None = setting(None, "dd (HAF default), triplet (baselines' default), sare_joint, sare_ind")
    margin: float | None = setting(None, "loss margin (default: the loss's, 0.1)")
    optimizer: str = setting("adam", "adam or sgd")
    lr: float = setting(1e-4, "learning rate")
    # VLAD heads often like 10x the backbone's
    head_lr: float | None = setting(None, "learning rate of the head (default: --lr)")
    momentum: float = 0.9
    weight_decay: float = setting(0.0, "weight decay")
    batch_size: int = setting(4, "tuples per iteration (across all ranks)")
    select: str = setting(
        "recall@5",
        "validation score that picks best.model: recall@5, recall@1 or recall@1+5 (their mean: "
        "for sets whose recall@5 is near 100)",
    )
    patience: int = setting(5, "stop after this many epochs without a gain in the --select score (0: never)")
    seed: int = setting(0, "random seed")
    # rounded up to a cache refresh, see loop.py
    checkpoint_every: int = setting(100, "iterations between checkpoints")
    time_budget: float | None = setting(
        None, "wall-clock budget in minutes for the whole run; stops cleanly when spent"
    )
    # data loading
    workers: int = setting(2, "image decoding threads")
    cache_images: str = setting("auto", "keep decoded images in memory: auto, yes or no")
    cache_limit: int = 3000  # 'auto' caches when the set has at most this many images (at 224x320)
    # Frozen-trunk cache (train/trunk_cache.py): the frozen backbone groups run once per image and
    # are stored on disk; steps and mining refreshes run only the trainable groups + head.
    # float16 (default; losses within ~1e-5 of the uncached run) | float32 (bit-exact) | no.
    # On whenever some backbone group is frozen (training has no random augmentation to defeat it).
    trunk_cache: str = setting(
        "float16",
        "store the frozen backbone groups' output once per image and train only "
        "the rest: float16, float32 (bit-exact) or no",
    )
    cache: str | None = setting(None, "trunk cache folder (default OUTPUT/.trunk_cache); runs may share one")
    eval_batch_size: int = 16
    max_val_queries: int | None = setting(None, "cap on validation queries (random, fixed by the seed)")
    progress: bool = True

    def __post_init__(self) -> None:
        self.image_size = parse_image_size(self.image_size)
        if self.levels is not None:
            self.levels = tuple(self.levels)

    def head_overrides(self) -> dict[str, Any]:
        """The head settings this run changes (``ModelConfig.for_method`` keywords)."""
        return {
            "num_clusters": self.clusters,
            "proj_dim": self.proj_dim,
            "levels": self.levels,
            "attention": self.attention,
        }

    def validate(self) -> None:
        if self.method not in METHODS:
            raise HaflocError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.supervision not in SUPERVISIONS:
            raise HaflocError(f"supervision must be one of {SUPERVISIONS}, got {self.supervision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise HaflocError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.cache_images not in ("auto", "yes", "no"):
            raise HaflocError(f"cache_images must be auto, yes or no, got {self.cache_images!r}")
        if self.select not in SELECT:
            raise HaflocError(f"select must be one of {', '.join(SELECT)}, got {self.select!r}")
        if self.trunk_cache not in TRUNK_CACHE:
            raise HaflocError(f"trunk_cache must be one of {', '.join(TRUNK_CACHE)}, got {self.trunk_cache!r}")
        for name in (
            "epochs",
            "batch_size",
            "num_negatives",
            "neg_pool",
            "cache_refresh",
            "checkpoint_every",
            "workers",
            "eval_batch_size",
        ):
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
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> "TrainConfig":
        """Strict: an unknown key is an error naming it (and ``source``, the file, when given)."""
        return from_mapping(cls, d, source=source, what="training setting")

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
        return cls.from_dict(data, source=path)

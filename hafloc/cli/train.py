"""``hafloc train``: train HAF or a baseline on a dataset (resumable; torchrun for several processes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..heads import METHODS

if TYPE_CHECKING:  # the training stack loads when the command runs, not when the parser is built
    from ..train.config import TrainConfig

def _levels(text: str) -> tuple[str, ...]:
    return tuple(v.strip().lower() for v in text.split(",") if v.strip())


def _on_off(text: str) -> bool:
    v = text.strip().lower()
    if v not in ("on", "off"):
        raise ValueError(text)
    return v == "on"


_on_off.__name__ = "on/off"  # argparse's message: "invalid on/off value"

# flag -> (TrainConfig field, type, help)
_FLAGS: list[tuple[str, str, type, str]] = [
    ("--method", "method", str, "haf (the paper) or a baseline: " + ", ".join(m for m in METHODS if m != "haf")),
    ("--dataset", "dataset", str, "dataset folder or ground-truth file (any layout 'hafloc eval' reads)"),
    ("--format", "format", str, "dataset layout (default: detected)"),
    ("--output", "output", str, "output folder: best.model, last.ckpt, history.csv/png, config.json"),
    ("--epochs", "epochs", int, "epochs (default 5)"),
    ("--image-size", "image_size", str, "training image size HxW (default 224x320); rounded to multiples of 32"),
    ("--backbone", "backbone", str, "efficientnet-lite0 (default), efficientnet-lite2 or vgg16"),
    ("--backbone-weights", "backbone_weights", str, "backbone state-dict file (vgg16, superpoint)"),
    ("--clusters", "clusters", int, "VLAD clusters per level (default 64)"),
    ("--proj-dim", "proj_dim", int, "HAF: channels per level after the 1x1 projection (default 128)"),
    ("--levels", "levels", _levels, "VLAD heads: comma-separated levels of low,mid,high (default: the method's; "
     "HAF all three)"),
    ("--attention", "attention", _on_off, "VLAD heads: attention masks on or off (default: the method's)"),
    ("--fit-images", "fit_images", int, "at most this many images for the cluster init (default 300)"),
    ("--train-stages", "train_stages", int, "trainable backbone stages, counted from the top (default 1)"),
    ("--dim", "dim", int, "fit PCA whitening to this dimension at the end (default: none)"),
    ("--supervision", "supervision", str, "auto (default), gps (10 m / 25 m) or labels"),
    ("--loss", "loss", str, "dd (HAF default), triplet (baselines' default), sare_joint, sare_ind"),
    ("--margin", "margin", float, "loss margin (default 0.1)"),
    ("--num-negatives", "num_negatives", int, "negatives per tuple (default 5)"),
    ("--neg-pool", "neg_pool", int, "random negatives scored per query and round (default 1000)"),
    ("--cache-refresh", "cache_refresh", int, "queries between refreshes of the cached descriptors (default 250)"),
    ("--max-queries-per-epoch", "max_queries_per_epoch", int, "cap on training queries per epoch"),
    ("--max-val-queries", "max_val_queries", int, "cap on validation queries (random, fixed by the seed)"),
    ("--val-fraction", "val_fraction", float, "held-out part of the database for sets without a val split (0.2)"),
    ("--optimizer", "optimizer", str, "adam (default) or sgd"),
    ("--lr", "lr", float, "learning rate (default 1e-4)"),
    ("--head-lr", "head_lr", float, "learning rate of the head (default: --lr)"),
    ("--weight-decay", "weight_decay", float, "weight decay (default 0)"),
    ("--batch-size", "batch_size", int, "tuples per iteration (default 4)"),
    ("--patience", "patience", int, "stop after this many epochs without val recall@5 gain (default 5; 0: never)"),
    ("--seed", "seed", int, "random seed (default 0)"),
    ("--checkpoint-every", "checkpoint_every", int, "iterations between checkpoints (default 100)"),
    ("--time-budget", "time_budget", float, "wall-clock budget in minutes; stops cleanly when spent"),
    ("--workers", "workers", int, "image decoding threads (default 2)"),
    ("--cache-images", "cache_images", str, "keep decoded images in memory: auto (default), yes, no"),
]


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model (HAF or a baseline) on a dataset",
        description="Weakly supervised training (NetVLAD-style hard-negative mining) with GPS (10 m positives, "
                    "25 m negatives) or label supervision. Writes best.model, last.ckpt, history.csv/png and "
                    "config.json into --output. --resume continues a stopped run exactly. Several processes: "
                    "torchrun --nproc_per_node N -m hafloc train ...")
    for flag, dest, typ, help_ in _FLAGS:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_)
    p.add_argument("--config", default=None, help="TrainConfig JSON file; flags given override it")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its last.ckpt (its config.json; --epochs / --time-budget may change)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def config_from_args(args) -> tuple[TrainConfig, bool]:
    from ..errors import HaflocError
    from ..train.config import TrainConfig

    given = {dest: getattr(args, dest) for _, dest, _, _ in _FLAGS if getattr(args, dest, None) is not None}
    if args.resume:
        cfg = TrainConfig.load(Path(args.resume) / "config.json")
        changed = sorted(k for k in given if k not in ("epochs", "time_budget", "workers", "output")
                         and getattr(cfg, k) != TrainConfig(**{k: given[k]}).__dict__[k])
        if changed:
            raise HaflocError(f"--resume keeps the run's settings; cannot change {', '.join(changed)}")
        for k in ("epochs", "time_budget", "workers"):
            if k in given:
                setattr(cfg, k, given[k])
        cfg.output = str(args.resume)
        resume = True
    else:
        base = TrainConfig.load(args.config).to_dict() if args.config else {}
        base.update(given)
        cfg = TrainConfig.from_dict(base)
        resume = False
    if args.no_progress:
        cfg.progress = False
    cfg.validate()
    return cfg, resume


def run(args) -> int:
    from ..train.loop import train

    cfg, resume = config_from_args(args)
    summary = train(cfg, resume=resume)
    if summary.get("rank", 0) == 0:
        hist = summary["history"]
        last = hist[-1] if hist else {}
        print(json.dumps({k: summary[k] for k in ("output", "best_epoch", "best_val_recall@5", "epochs_done",
                                                   "iterations", "stopped_for_time", "supervision", "loss",
                                                   "dropped_queries", "seconds")}))
        if last:
            print(f"last epoch {last.get('epoch')}: val R@1 {last.get('val_recall@1')} R@5 {last.get('val_recall@5')}")
    return 0

"""``hafloc train``: train HAF or a baseline on a dataset (resumable; torchrun for several processes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..configs import flag_fields, flag_help
from ..train.config import TrainConfig


def _flags() -> list[tuple[str, str, Callable[[str], Any], str]]:
    """(flag, TrainConfig field, type, help) for every field that declares a help text."""
    return [("--" + f.name.replace("_", "-"), f.name, typ, flag_help(f)) for f, typ in flag_fields(TrainConfig)]


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (HAF or a baseline) on a dataset",
        description="Weakly supervised training (NetVLAD-style hard-negative mining) with GPS (10 m positives, "
        "25 m negatives) or label supervision. Writes best.model, last.ckpt, history.csv/png and "
        "config.json into --output. --resume continues a stopped run exactly. Several processes: "
        "torchrun --nproc_per_node N -m hafloc train ...",
    )
    for flag, dest, typ, help_ in _flags():
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_)
    p.add_argument("--config", default=None, help="TrainConfig JSON file; flags given override it")
    p.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR from its last.ckpt (its config.json; --epochs / --time-budget may change)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def config_from_args(args) -> tuple[TrainConfig, bool]:
    from ..errors import HaflocError

    given = {dest: getattr(args, dest) for _, dest, _, _ in _flags() if getattr(args, dest, None) is not None}
    if args.resume:
        cfg = TrainConfig.load(Path(args.resume) / "config.json")
        changed = sorted(
            k
            for k in given
            if k not in ("epochs", "time_budget", "workers", "output", "cache")
            and getattr(cfg, k) != TrainConfig(**{k: given[k]}).__dict__[k]
        )
        if changed:
            raise HaflocError(f"--resume keeps the run's settings; cannot change {', '.join(changed)}")
        for k in ("epochs", "time_budget", "workers", "cache"):
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
        print(
            json.dumps(
                {
                    k: summary[k]
                    for k in (
                        "output",
                        "best_epoch",
                        "best_val_recall@5",
                        "epochs_done",
                        "iterations",
                        "stopped_for_time",
                        "supervision",
                        "loss",
                        "dropped_queries",
                        "seconds",
                    )
                }
            )
        )
        if last:
            print(f"last epoch {last.get('epoch')}: val R@1 {last.get('val_recall@1')} R@5 {last.get('val_recall@5')}")
    return 0

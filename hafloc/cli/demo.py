"""``hafloc demo``: synthetic city -> train HAF and the baselines -> tune -> evaluate -> HTML report."""

from __future__ import annotations

from ..demo.config import DEMO_METHODS
from ..heads import METHODS


def _methods(text: str) -> tuple[str, ...]:
    return tuple(m.strip().lower() for m in text.split(",") if m.strip())


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole system on a synthetic city, with an HTML report (no download)",
        description="Generates a synthetic city ('@' folders), trains HAF and the NetVLAD / CRN / GeM baselines "
        "on its training split with GPS supervision, tunes HAF's fusion weights on val, evaluates "
        "every method on test (overall and by landmark size) and writes DIR/index.html and "
        "DIR/results.json. About 10 minutes on a 2-core CPU (--quick: about 1.5). Rerunning reuses "
        "every finished stage; an interrupted run resumes.",
    )
    p.add_argument("--quick", action="store_true", help="small city, small images, fewer training epochs per method")
    p.add_argument(
        "--output", default="hafloc-demo", help="output folder: data, models, figures, index.html (default hafloc-demo)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the city and of training (default 0)")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="train every method with N seeds (--seed, --seed+1, ...); the report adds their spread "
        "(mean +- std) and HAF's paired bootstrap interval against the best baseline (default 1)",
    )
    p.add_argument(
        "--methods",
        type=_methods,
        default=None,
        help=f"comma-separated methods of {','.join(METHODS)} (default {','.join(DEMO_METHODS)})",
    )
    p.add_argument(
        "--train-minutes",
        type=float,
        default=None,
        help="cap on the training time per method in minutes (default: none; the budget is in epochs)",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx"],
        default=None,
        help="extraction engine (default auto: ONNX Runtime when installed; --quick: torch)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (stage lines only)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import DemoConfig, run_demo

    cfg = DemoConfig.create(
        args.output,
        quick=args.quick,
        seed=args.seed,
        methods=args.methods,
        seeds=args.seeds,
        train_minutes=args.train_minutes,
        backend=args.backend,
        progress=not args.no_progress,
    )
    run_demo(cfg)
    return 0

"""``hafloc index calibrate`` and the calibration parts of ``index build`` / ``index info``."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import print_json


def register_calibrate(isub) -> None:
    from ..index.calibrate import DEFAULT_AGREE_M, DEFAULT_EXCLUDE_M, DEFAULT_K, MIN_SAMPLES

    c = isub.add_parser(
        "calibrate",
        help="fit the index's confidence calibration (leave-one-out over its own photos)",
        description="Locates every positioned photo of the index (at most --max-samples of them) against the "
        "others, hiding the photo itself and its neighbours closer than --exclude-m metres, and fits "
        "the probability that an estimate lies within --agree-m metres of the truth from the best "
        "similarity, the margin to the best match elsewhere, the agreement of the top matches (and "
        "verified inliers when re-ranking provides them). 'hafloc locate' then reports that "
        "probability as its confidence. Writes INDEX/calibration.json, kept only when its held-out "
        "ECE beats the uncalibrated confidence's on the same answers (else exit status 1: locate "
        f"keeps the uncalibrated confidence). Below {MIN_SAMPLES} leave-one-out answers it refuses "
        "unless --force.",
    )
    c.add_argument("--index", required=True, help="index folder")
    c.add_argument(
        "--agree-m",
        type=float,
        default=DEFAULT_AGREE_M,
        help=f"an estimate is right within this many metres (default {DEFAULT_AGREE_M:g})",
    )
    c.add_argument(
        "--exclude-m",
        type=float,
        default=None,
        help="also hide each photo's neighbours closer than this, so near-duplicate video frames do "
        f"not make the calibration optimistic (default: {DEFAULT_EXCLUDE_M:g}, or 0 when that "
        "leaves too few right answers, as when all photos of a place share one position; "
        "0 hides only the photo itself)",
    )
    c.add_argument("--top-k", type=int, default=DEFAULT_K, help=f"matches per estimate (default {DEFAULT_K})")
    c.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="locate at most this many photos, a fixed random subset (default 5000; 500 when the index "
        "stores local features: each is then re-ranked by verified matches, and the re-ranking "
        "rule is fitted first, on the same photos)",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--force",
        action="store_true",
        help=f"calibrate even from fewer than {MIN_SAMPLES} leave-one-out answers (a rough fit, with a warning)",
    )
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=run_calibrate)


def run_calibrate(args) -> int:
    from ..errors import HaflocError
    from ..index.build import calibrate_store
    from ..index.calibrate import MIN_SAMPLES, CalibrationNotKept, summary_line
    from ..index.store import IndexStore

    if args.top_k < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise HaflocError("--top-k and --max-samples must be at least 1")
    if not args.agree_m > 0 or (args.exclude_m is not None and not args.exclude_m >= 0):
        raise HaflocError(
            f"--agree-m must be positive and --exclude-m non-negative (got {args.agree_m}, {args.exclude_m})"
        )
    with IndexStore.open(args.index) as store:
        try:
            cal = calibrate_store(
                store,
                agree_m=args.agree_m,
                exclude_m=args.exclude_m,
                k=args.top_k,
                max_samples=args.max_samples,
                seed=args.seed,
                progress=not args.no_progress,
                min_samples=0 if args.force else MIN_SAMPLES,
            )
        except CalibrationNotKept as err:
            print(f"hafloc: {err}", file=sys.stderr)
            return 1
    if cal.meta["n_samples"] < MIN_SAMPLES:
        print(
            f"hafloc: warning: calibrated on only {cal.meta['n_samples']} leave-one-out answers (fewer than "
            f"{MIN_SAMPLES}): its probabilities are rough",
            file=sys.stderr,
        )
    if args.json:
        from ..index.info import calibration_summary

        print_json({"index": str(args.index), "calibration": calibration_summary(cal.meta)})
    else:
        print(f"{args.index}: {summary_line(cal)}")
    return 0


def auto_calibrate(index: str | Path, progress: bool) -> None:
    """End of ``index build``: calibrate when the index has enough positioned photos; never fails the build."""
    from ..index.build import auto_calibrate as calibrate_if_possible
    from ..index.store import IndexStore

    with IndexStore.open(index) as store:
        cal, note = calibrate_if_possible(store, progress=progress)
    print(f"{index}: {note}", file=sys.stdout if cal is not None else sys.stderr)


def write_report(index: str | Path, out_dir: str | Path, summary: list[str]) -> tuple[Path, str | None]:
    """``index info --report DIR``: the index's ``summary`` lines, then the calibration's reliability
    diagram, ECE and accuracy/coverage as a small HTML page. An uncalibrated index still gets its
    page; the second value then says (one line) what it lacks, else None."""
    from ..index.calibrate import load_calibrator
    from ..index.store import IndexStore
    from ..reports.calibration import write_calibration_report

    with IndexStore.open(index) as store:
        cal = load_calibrator(store)
    path = write_calibration_report(
        cal.meta if cal is not None else None, out_dir, title=f"Confidence calibration of {index}", summary=summary
    )
    if cal is not None:
        return path, None
    return path, (
        f"{index} is not calibrated (for this model): {path} holds the index summary but no reliability "
        f"diagram; 'hafloc index calibrate --index {index}' fits one"
    )

"""``hafloc locate``: where were these photos taken? Top-k matches and a position estimate."""

from __future__ import annotations

import sys
from pathlib import Path

from ..index.export_formats import FORMATS
from .common import add_answer_args, add_backend_args, check_answer_args, report_failures


def register(sub) -> None:
    p = sub.add_parser(
        "locate",
        help="estimate where photos were taken, from an index",
        description="For each photo: the top-K most similar indexed photos (with their positions, "
        "similarity and distance from the estimate: the table's 'from est.' column, JSON "
        "'distance_m'; how far each match lies from the estimated position, not from the photo) "
        "and a position estimate with a "
        "confidence in [0, 1]: on a calibrated index ('hafloc index calibrate') the "
        "probability that the estimate lies within the agreement radius, otherwise a "
        "heuristic score (JSON 'calibrated' says which). Folders are searched "
        "recursively; unreadable photos are skipped and named.",
    )
    p.add_argument("images", nargs="+", help="photos and/or folders")
    p.add_argument("--index", required=True, help="index folder (from 'hafloc index build')")
    p.add_argument(
        "--top-k",
        type=int,
        default=10,
        help="matches per photo (default 10); on an uncalibrated index they are also the matches the "
        "estimate is made from (a calibrated index estimates from its calibration's top 10, whatever --top-k shows)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="table (default, for reading); json {index, results: [...], failures: [...]}; csv (a row "
        "per photo: estimate, confidence, best match); geojson (a Point feature per photo, null "
        "geometry when there is no estimate); kml (a Placemark per photo, for Google Earth / GIS)",
    )
    p.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    p.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="write the result to FILE (atomically: all or nothing) instead of standard output; "
        "left untouched when no photo could be located; a symlink's target is replaced, a FIFO or "
        "device (/dev/stdout) written through",
    )
    p.add_argument("--model", help="model file (default: the one the index was built with)")
    p.add_argument(
        "--agree-m",
        type=float,
        default=None,
        help="matches within this many metres of each other vote for one place, and the place with "
        "the most similarity wins (after re-ranking: the best verified match's place) (default: the "
        "calibration's radius, 25 m; another value makes the confidence uncalibrated)",
    )
    add_answer_args(p)
    p.add_argument(
        "--near",
        metavar="LAT,LON",
        help="a position prior: search only indexed photos within --within metres of this place "
        "(exactly, whatever the search structure)",
    )
    p.add_argument("--within", type=float, metavar="M", help="with --near: the radius in metres")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_backend_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import HaflocError, InputError
    from ..images.io import list_images
    from ..index.export_formats import render, write_output
    from ..index.locator import Locator, LocatorConfig
    from ..index.prior import Near

    if args.top_k < 1:
        raise HaflocError(f"--top-k must be at least 1, got {args.top_k}")
    check_answer_args(args)
    near = Near.parse(args.near, args.within)
    if args.agree_m is not None and not args.agree_m > 0:
        raise HaflocError(f"--agree-m must be positive, got {args.agree_m}")
    paths: list[Path] = []
    failures: list[tuple[str, str]] = []
    for item in args.images:
        try:
            paths.extend(p for p, _ in list_images([item]))
        except InputError as err:  # a missing path is one bad input, not the end of the batch
            failures.append((item, err.cause))
    config = LocatorConfig(
        backend=args.backend,
        batch_size=args.batch_size,
        max_side=args.max_side,
        num_threads=args.threads,
        agree_m=args.agree_m,
        min_confidence=args.min_confidence,
        rerank=args.rerank,
    )
    locator = Locator(args.index, args.model, config)
    for warning in locator.warnings:
        print(f"hafloc: warning: {warning}", file=sys.stderr)
    try:
        names = [str(p) for p in paths]
        results, bad = (
            locator.locate_paths(paths, names, k=args.top_k, progress=not args.no_progress, near=near)
            if paths
            else ([], [])
        )
    finally:
        locator.close()
    failures.extend(bad)
    doc = {"index": str(args.index), "results": results, "failures": [{"image": n, "error": r} for n, r in failures]}
    text = render(doc, args.format, radius_m=args.agree_m)
    if args.output is None:
        sys.stdout.write(text)
    elif results:
        write_output(args.output, text)
        print(f"wrote {len(results)} result(s) as {args.format} to {args.output}", file=sys.stderr)
    report_failures(failures, len(results) + len(failures))
    if not results:
        print(
            "hafloc: error: no photo could be located" + (f"; {args.output} not written" if args.output else ""),
            file=sys.stderr,
        )
        return 2  # every input was bad
    return 0

"""``hafloc locate``: where were these photos taken? Top-k matches and a position estimate."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import add_backend_args, print_json, report_failures


def register(sub) -> None:
    p = sub.add_parser("locate", help="estimate where photos were taken, from an index",
                       description="For each photo: the top-K most similar indexed photos (with their positions, "
                                   "similarity and distance from the estimate) and a position estimate with a "
                                   "confidence in [0, 1]: on a calibrated index ('hafloc index calibrate') the "
                                   "probability that the estimate lies within the agreement radius, otherwise a "
                                   "heuristic score (JSON 'calibrated' says which). Folders are searched "
                                   "recursively; unreadable photos are skipped and named.")
    p.add_argument("images", nargs="+", help="photos and/or folders")
    p.add_argument("--index", required=True, help="index folder (from 'hafloc index build')")
    p.add_argument("--top-k", type=int, default=10, help="matches per photo (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON: {results: [...], failures: [...]}")
    p.add_argument("--model", help="model file (default: the one the index was built with)")
    p.add_argument("--agree-m", type=float, default=None,
                   help="matches within this many metres of the best one vote for its place (default: the "
                        "calibration's radius, 25 m; another value makes the confidence uncalibrated)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="P",
                   help="answer 'unknown' (JSON: estimate null, unknown.reason) when the confidence is below P")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_backend_args(p)
    p.set_defaults(func=run)


def _fmt(v, spec: str) -> str:
    return format(v, spec) if v is not None else format("-", ">" + spec.split(".")[0])


def print_table(res: dict, out=None) -> None:
    """One photo's result as a readable block."""
    out = out or sys.stdout
    est = res["estimate"]
    if est is None:
        unknown = res.get("unknown") or {"reason": "no match has a position"}
        what = "no estimate" if unknown["reason"] == "no match has a position" else "unknown"
        print(f"{res['image']}: {what} ({unknown['reason']})", file=out)
    else:
        kind = f"calibrated for {res['radius_m']:g} m" if res.get("calibrated") and "radius_m" in res else "uncalibrated"
        print(f"{res['image']}: {est['lat']:.6f}, {est['lon']:.6f}  (confidence {est['confidence']:.2f}, {kind})",
              file=out)
    print(f"  {'#':>2}  {'similarity':>10}  {'distance':>10}  {'lat':>11}  {'lon':>11}  image", file=out)
    for i, m in enumerate(res["matches"], 1):
        dist = "-" if m["distance_m"] is None else _human_m(m["distance_m"])
        print(f"  {i:>2}  {m['similarity']:>10.4f}  {dist:>10}  {_fmt(m['lat'], '11.6f')}  {_fmt(m['lon'], '11.6f')}  "
              f"{m['image']}", file=out)


def _human_m(d: float) -> str:
    return f"{d:.1f} m" if d < 1000 else f"{d / 1000:.1f} km"


def run(args) -> int:
    from ..errors import HaflocError, InputError
    from ..images.io import list_images
    from ..serve.locator import Locator, LocatorConfig

    if args.top_k < 1:
        raise HaflocError(f"--top-k must be at least 1, got {args.top_k}")
    if args.min_confidence is not None and not 0.0 <= args.min_confidence <= 1.0:
        raise HaflocError(f"--min-confidence must lie in [0, 1], got {args.min_confidence}")
    if args.agree_m is not None and not args.agree_m > 0:
        raise HaflocError(f"--agree-m must be positive, got {args.agree_m}")
    paths: list[Path] = []
    failures: list[tuple[str, str]] = []
    for item in args.images:
        try:
            paths.extend(p for p, _ in list_images([item]))
        except InputError as err:  # a missing path is one bad input, not the end of the batch
            failures.append((item, err.cause))
    config = LocatorConfig(backend=args.backend, batch_size=args.batch_size, max_side=args.max_side,
                           num_threads=args.threads, agree_m=args.agree_m, min_confidence=args.min_confidence)
    locator = Locator(args.index, args.model, config)
    for warning in locator.warnings:
        print(f"hafloc: warning: {warning}", file=sys.stderr)
    try:
        names = [str(p) for p in paths]
        results, bad = locator.locate_paths(paths, names, k=args.top_k, progress=not args.no_progress) if paths \
            else ([], [])
    finally:
        locator.close()
    failures.extend(bad)
    if args.json:
        print_json({"index": str(args.index), "results": results,
                    "failures": [{"image": n, "error": r} for n, r in failures]})
    else:
        for res in results:
            print_table(res)
            print()
    report_failures(failures, len(results) + len(failures))
    if not results:
        print("hafloc: error: no photo could be located", file=sys.stderr)
        return 1
    return 0

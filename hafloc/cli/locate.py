"""``hafloc locate``: where were these photos taken? Top-k matches and a position estimate."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import add_backend_args, print_json, report_failures


def register(sub) -> None:
    p = sub.add_parser("locate", help="estimate where photos were taken, from an index",
                       description="For each photo: the top-K most similar indexed photos (with their positions, "
                                   "similarity and distance from the estimate) and a position estimate with a "
                                   "confidence in [0, 1]. Folders are searched recursively; unreadable photos are "
                                   "skipped and named.")
    p.add_argument("images", nargs="+", help="photos and/or folders")
    p.add_argument("--index", required=True, help="index folder (from 'hafloc index build')")
    p.add_argument("--top-k", type=int, default=10, help="matches per photo (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON: {results: [...], failures: [...]}")
    p.add_argument("--model", help="model file (default: the one the index was built with)")
    p.add_argument("--agree-m", type=float, default=25.0,
                   help="matches within this many metres of the best one vote for its place (default 25)")
    p.add_argument("--rerank", type=int, default=None, metavar="K",
                   help="re-rank the top K matches by geometrically verified local matches (default 10 when the "
                        "index stores local features, see 'index build --local'; 0 = global similarity only)")
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
        print(f"{res['image']}: no estimate (no match has a position)", file=out)
    else:
        verified = ", verified" if est.get("verified") else ""
        print(f"{res['image']}: {est['lat']:.6f}, {est['lon']:.6f}  (confidence {est['confidence']:.2f}{verified})",
              file=out)
    print(f"  {'#':>2}  {'similarity':>10}  {'inliers':>7}  {'distance':>10}  {'lat':>11}  {'lon':>11}  image", file=out)
    for i, m in enumerate(res["matches"], 1):
        dist = "-" if m["distance_m"] is None else _human_m(m["distance_m"])
        inl = "-" if m.get("inliers") is None else str(m["inliers"])
        print(f"  {i:>2}  {m['similarity']:>10.4f}  {inl:>7}  {dist:>10}  {_fmt(m['lat'], '11.6f')}  "
              f"{_fmt(m['lon'], '11.6f')}  {m['image']}", file=out)


def _human_m(d: float) -> str:
    return f"{d:.1f} m" if d < 1000 else f"{d / 1000:.1f} km"


def run(args) -> int:
    from ..errors import HaflocError, InputError
    from ..images.io import list_images
    from ..serve.locator import Locator, LocatorConfig

    if args.top_k < 1:
        raise HaflocError(f"--top-k must be at least 1, got {args.top_k}")
    paths: list[Path] = []
    failures: list[tuple[str, str]] = []
    for item in args.images:
        try:
            paths.extend(p for p, _ in list_images([item]))
        except InputError as err:  # a missing path is one bad input, not the end of the batch
            failures.append((item, err.cause))
    config = LocatorConfig(backend=args.backend, batch_size=args.batch_size, max_side=args.max_side,
                           num_threads=args.threads, agree_m=args.agree_m, rerank=args.rerank)
    locator = Locator(args.index, args.model, config)
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

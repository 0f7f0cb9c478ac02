"""``hafloc dataset prepare``: public street-view repositories -> the '@' layout with geographic splits."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("dataset", help="prepare training/benchmark sets from public repositories")
    dsub = p.add_subparsers(dest="dataset_command", metavar="ACTION")
    q = dsub.add_parser(
        "prepare",
        help="convert a cloned street-view repository into the '@' layout (train/val/test)",
        description="Reads a clone of the source repository (a checkout, or its git directory: "
        "'git clone --bare' or a mirror) and writes OUTPUT/images/{train,val,test}/{database,queries}/ "
        "in the '@' layout that train, eval and index read, plus OUTPUT/prepare.json. The split is "
        "geographic: bands across the area (test, then val, ~15%% of places each) separated by "
        "--gap metres whose places are dropped, so no test place is near a training one. "
        "cambridge-streetview (GreenSlime96/StreetView-Localisation): 4 headings per location, the "
        "upward view dropped; queries = every 3rd location of a split. sf-night (AMLSquad/CosPlace, "
        "commit 6708db5, syntethic_night_augmentation/): places are 15 m cells; queries = one capture "
        "month of each place seen in 2+ months, scored only against other months (protocol.json). "
        "Identical images are kept once. Rerunning skips what was written. Never redistribute the output.",
    )
    q.add_argument("source_kind", choices=["cambridge-streetview", "sf-night"], help="which repository")
    q.add_argument("--source", required=True, help="clone of the repository (checkout or git directory)")
    q.add_argument("--output", required=True, help="dataset folder to write")
    q.add_argument("--seed", type=int, default=0, help="turns the direction of the split bands (default 0: east)")
    q.add_argument("--gap", type=float, default=50.0, help="metres between split bands, >= 50 (default 50)")
    q.add_argument("--rev", help="revision to read from a git directory (default: HEAD; sf-night: 6708db5)")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=run_prepare)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def run_prepare(args) -> int:
    from ..datasets.prepare import prepare
    from .common import print_json

    s = prepare(
        args.source_kind,
        args.source,
        args.output,
        seed=args.seed,
        gap_m=args.gap,
        rev=args.rev,
        progress=not args.no_progress,
    )
    if args.json:
        print_json(s)
        return 0
    print(f"{args.output}: {s['source']} in the '@' layout (seed {s['seed']}, bands {s['gap_m']:g} m apart)")
    for split, c in s["images"].items():
        print(f"  {split:5s}  {s['places'][split]:4d} places  {c['database']:5d} database  {c['queries']:5d} queries")
    print(
        f"  dropped: {s['places_dropped_in_gaps']} places ({s['images_dropped_in_gaps']} images) in the gaps, "
        f"{s['duplicates_dropped']} duplicate images"
    )
    print(f"  protocol: {s['protocol']}")
    return 0

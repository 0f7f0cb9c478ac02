"""``hafloc index build|add|info|export-hloc|remove|set-position|verify|compact``: the persistent
index of your geotagged photos."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

from ..index.info import index_info
from .common import add_backend_args, add_ray_args, make_extractor, print_json, ray_pool, report_failures
from .index_calibrate import auto_calibrate, register_calibrate, write_report


def register(sub) -> None:
    p = sub.add_parser(
        "index",
        help="build and manage a persistent index of geotagged photos",
        description="An index folder holds one descriptor per photo (faiss), its metadata and position "
        "(SQLite) and the fingerprint of the model that described it. Positions come from "
        "a positions CSV (image,lat,lon), '@' file names or EXIF GPS, in that order; "
        "photos without one are indexed and reported as unpositioned.",
    )
    isub = p.add_subparsers(dest="index_command", metavar="ACTION")

    def building(q, new_index: bool) -> None:
        q.add_argument("folder", help="folder of photos (searched recursively)")
        q.add_argument("--index", required=True, help="index folder")
        q.add_argument(
            "--model",
            default="default" if new_index else None,
            help="model file"
            + (
                " (default: 'default', the shipped HAF trained on real street views; see 'hafloc model info default')"
                if new_index
                else " (default: the one the index was built with)"
            ),
        )
        q.add_argument(
            "--positions", help="CSV with header image,lat,lon (image: path relative to FOLDER or file name)"
        )
        q.add_argument(
            "--chunk-size",
            type=int,
            default=64,
            help="images committed per transaction; a killed run resumes after the last one (default 64)",
        )
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        add_lock_arg(q)
        add_backend_args(q)
        add_ray_args(q)
        if new_index:  # build: the index's local features are chosen once, add follows them
            q.add_argument(
                "--local",
                metavar="EXTRACTOR",
                default="auto",
                help="also store local features for re-ranking by verified matches (xfeat: fastest on "
                "CPU; disk; aliked; superpoint; none). Default auto: xfeat with the shipped default model "
                "(its measured pipeline: locate then re-ranks by verified matches; about 140 kB per photo), "
                "none with a model of your own",
            )
            q.add_argument("--max-keypoints", type=int, default=1024, help="local features per image (default 1024)")
            q.add_argument(
                "--local-max-side",
                type=int,
                default=640,
                help="longest image side for local features, pixels (default 640)",
            )

    b = isub.add_parser(
        "build",
        help="index a folder (creates the index, or resumes an interrupted build)",
        description="Creates INDEX from the photos in FOLDER. Atomic and resumable: rerunning after "
        "an interruption finishes the job without duplicates.",
    )
    building(b, new_index=True)
    b.add_argument("--exact", action="store_true", help="exact (flat) search whatever the database size")
    b.add_argument(
        "--search",
        choices=["auto", "flat", "ivfpq", "hnsw", "ondisk"],
        default="auto",
        help="search structure (auto: exact up to 100k images, ondisk above: IVF-PQ with memory-mapped "
        "lists, re-ranked exactly; ivfpq/hnsw: in RAM)",
    )
    b.add_argument(
        "--dim",
        metavar="N|full",
        type=_dim_arg,
        default=None,
        help="store descriptors PCA-whitened to N dimensions (e.g. 256, 1024, 4096; fitted on the first "
        "images; queries are projected the same way) or 'full' as the model gives them. Default: "
        "full, and 256 above 100k images or 8 GB of float32 descriptors",
    )
    b.add_argument(
        "--dtype",
        choices=["float16", "float32"],
        default=None,
        help="storage of the descriptors used for exact search and re-ranking (default float32; float16 "
        "above the size where --dim turns compact)",
    )
    b.add_argument(
        "--no-adapt",
        action="store_true",
        help="keep a trained model's clusters as trained (default: from 18 photos, re-fit them by k-means on "
        "the photos indexed, into INDEX/adapted.model; untrained models are never changed)",
    )
    b.add_argument(
        "--no-calibrate",
        action="store_true",
        help="skip the confidence calibration run at the end (from 50 positioned photos)",
    )
    b.set_defaults(func=run_build)

    a = isub.add_parser(
        "add",
        help="append the photos of a folder to an existing index",
        description="Adds new photos (already indexed ones are skipped) with the index's model.",
    )
    building(a, new_index=False)
    a.set_defaults(func=run_add)

    i = isub.add_parser("info", help="describe an index")
    i.add_argument("index", help="index folder")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument(
        "--report",
        metavar="DIR",
        help="write DIR/index.html: the index summary, the confidence calibration's reliability diagram, ECE and "
        "accuracy/coverage curve (an uncalibrated index: the summary and a note)",
    )
    i.set_defaults(func=run_info)

    register_calibrate(isub)

    e = isub.add_parser(
        "export-hloc",
        help="hloc global descriptors (.h5) and retrieval pairs for queries",
        description="Writes OUTPUT/global-feats-hafloc.h5 (database and query descriptors in hloc's "
        "layout), OUTPUT/pairs-query-hafloc{K}.txt ('query db' per line, top-K per query) "
        "and OUTPUT/db.txt / queries.txt (name lists for hloc's pairs_from_retrieval). "
        "When the index stores local features, also OUTPUT/features.h5 and "
        "OUTPUT/matches.h5 (hloc's matches0 / matching_scores0 per pair), so hloc's "
        "triangulation and localization can take over; --db-pairs adds what triangulating the "
        "database needs. One export at a time writes to an OUTPUT folder; it leaves only these files there.",
    )
    e.add_argument("--index", required=True, help="index folder")
    e.add_argument("--queries", required=True, help="folder of query photos")
    e.add_argument("--output", required=True, help="output folder")
    e.add_argument("--top-k", type=int, default=20, help="database images per query (default 20)")
    e.add_argument("--model", help="model file (default: the one the index was built with)")
    e.add_argument("--half", action="store_true", help="store float16 descriptors, as hloc's extractor does")
    e.add_argument(
        "--keep-negative",
        action="store_true",
        help="keep candidates with similarity < 0 (hloc's pairs_from_retrieval drops them; so do we by default)",
    )
    e.add_argument(
        "--db-pairs",
        type=int,
        default=0,
        metavar="N",
        help="also write OUTPUT/pairs-db-hafloc{N}.txt: the top-N database images of every database "
        "image by global similarity ('db db' per line, as hloc's pairs_from_retrieval with the database "
        "as queries writes it), for hloc's triangulation of the database; with local features in the "
        "index, features.h5 then holds every database image and matches.h5 these pairs too (default 0: none)",
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_backend_args(e)
    e.set_defaults(func=run_export)

    r = isub.add_parser(
        "remove",
        help="drop images (files, folders, or those whose file is gone) from an index",
        description="Drops the rows of the given images (a folder: every indexed image under it) and "
        "rebuilds the search structure. Their descriptors stay in the chunk files until "
        "'hafloc index compact'. A named image or folder that is not in the index is listed and "
        "makes the exit status 1 (the others are removed all the same).",
    )
    r.add_argument("images", nargs="*", help="indexed image files and/or folders")
    r.add_argument("--index", required=True, help="index folder")
    r.add_argument("--missing", action="store_true", help="also drop every image whose file no longer exists")
    add_lock_arg(r)
    r.set_defaults(func=run_remove)

    sp = isub.add_parser(
        "set-position",
        help="set (or correct) the position of an indexed image",
        description="Gives IMAGE the WGS84 position LAT LON in degrees (e.g. x.jpg -33.9 18.4; its UTM "
        "is recomputed; source 'manual').",
    )
    sp.add_argument("image", help="an indexed image file")
    sp.add_argument("lat", type=float, help="latitude in degrees, -90..90")
    sp.add_argument("lon", type=float, help="longitude in degrees, -180..180")
    sp.add_argument("--index", required=True, help="index folder")
    add_lock_arg(sp)
    sp.set_defaults(func=run_set_position)

    v = isub.add_parser(
        "verify",
        help="check every file of an index (exit 1 on damage)",
        description="Checks index.json, the SQLite database (integrity_check), every chunk file "
        "(readable, shape, dtype, row counts, local features of every row, the checksum recorded when "
        "it was written: 'skipped' for chunks written before hafloc kept them), rows pointing at missing "
        "chunks, orphan files, the search files (and that they hold the chunks' vectors), the indexed "
        "image files and the model fingerprint. Changes nothing; exit status 1 when something is "
        "damaged, 0 otherwise.",
    )
    v.add_argument("--index", required=True, help="index folder")
    v.add_argument("--json", action="store_true", help="machine-readable report")
    v.add_argument("--no-model", action="store_true", help="skip loading the model to check its fingerprint")
    v.set_defaults(func=run_verify)

    c = isub.add_parser(
        "compact",
        help="rewrite chunk files without the rows of removed images",
        description="Rewrites every chunk file that still holds descriptors of removed images, "
        "deletes orphan files and rebuilds the search structure if needed.",
    )
    c.add_argument("--index", required=True, help="index folder")
    add_lock_arg(c)
    c.set_defaults(func=run_compact)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _dim_arg(v: str) -> int | str:
    import argparse

    if v.lower() == "full":
        return "full"
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of dimensions or 'full', got {v!r}")
    return n


def add_lock_arg(q) -> None:
    q.add_argument(
        "--lock-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for another process writing the index (default 600, env HAFLOC_LOCK_TIMEOUT)",
    )


def _index_folder(args, store_factory) -> int:
    from ..errors import HaflocError, printable
    from ..images.io import IMAGE_EXTENSIONS, list_images, unsupported_images
    from ..index.positions import read_positions_csv, unused_rows
    from ..index.store import extractor_fn

    folder = Path(args.folder)
    if not folder.is_dir():
        raise HaflocError(f"{folder}: not a folder")
    if args.chunk_size < 1:
        raise HaflocError(f"--chunk-size must be at least 1, got {args.chunk_size}")
    positions = read_positions_csv(args.positions) if args.positions else None
    pairs = list_images([folder])
    skipped = unsupported_images(folder)
    if skipped:
        kinds = ", ".join(sorted({p.suffix.lower() or p.name for p in skipped}))
        print(
            f"skipped {len(skipped)} file(s) of an image type hafloc does not read ({kinds}; it reads "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}):",
            file=sys.stderr,
        )
        for p in skipped[:20]:
            print(f"  {printable(p.relative_to(folder))}", file=sys.stderr)
        if len(skipped) > 20:
            print(f"  ... and {len(skipped) - 20} more", file=sys.stderr)
    if not pairs:
        raise HaflocError(f"{folder}: no images found" + (f" ({len(skipped)} skipped, see above)" if skipped else ""))
    if positions:
        unused = unused_rows(positions, [p.relative_to(folder).as_posix() for p, _ in pairs])
        if unused:
            print(
                f"warning: {len(unused)} of {len(positions)} row(s) of {printable(args.positions)} name no image "
                f"in {printable(folder)} (e.g. {', '.join(map(printable, unused[:3]))}); their positions are unused",
                file=sys.stderr,
            )
    store, model = store_factory([p for p, _ in pairs])
    with store, ExitStack() as stack:
        if args.ray:  # an actor pool describes the chunks; they are committed here all the same
            extract = stack.enter_context(ray_pool(args, model, [p for p, _ in pairs], store.local_config)).extract_fn()
        else:
            local = None
            if store.local_config:
                from ..local import create_extractor

                local = create_extractor(store.local_config["extractor"], **store.local_config.get("conf", {}))
            extract = extractor_fn(make_extractor(model, args), local)
        # relative to the folder: the store resolves them against the root it records
        report = store.add(
            [p.relative_to(folder) for p, _ in pairs],
            folder,
            extract,
            positions=positions,
            chunk_size=args.chunk_size,
            progress=not args.no_progress,
        )
        total, positioned = len(store), store.info["counts"]["positioned"]
    report_failures(report.failed, len(pairs))
    if report.unpositioned:
        print(
            f"{len(report.unpositioned)} image(s) indexed without a position (no CSV row, '@' name or EXIF GPS):",
            file=sys.stderr,
        )
        for name in report.unpositioned:
            print(f"  {printable(name)}", file=sys.stderr)
    if report.invalid_positions:
        print(
            f"warning: {len(report.invalid_positions)} image(s) have an invalid position and were indexed without one:",
            file=sys.stderr,
        )
        for name, why in report.invalid_positions:
            print(f"  {printable(name)}: {why}", file=sys.stderr)
    if report.duplicates:
        print(
            f"warning: {len(report.duplicates)} image(s) have the same content as another indexed image "
            "(indexed anyway):",
            file=sys.stderr,
        )
        for name, other in report.duplicates[:20]:
            print(f"  {printable(name)} = {printable(other)}", file=sys.stderr)
        if len(report.duplicates) > 20:
            print(f"  ... and {len(report.duplicates) - 20} more", file=sys.stderr)
    print(
        f"{args.index}: added {report.added}, already indexed {report.skipped_existing}, failed {len(report.failed)}; "
        f"index holds {total} image(s), {positioned} with a position"
    )
    return 0 if report.added or report.skipped_existing or not report.failed else 2  # every image was bad


def run_build(args) -> int:
    from ..descriptors.modelfile import DEFAULT, load_model, recorded_path
    from ..errors import HaflocError
    from ..index.adapt import adapt_model
    from ..index.build import local_spec
    from ..index.search import SearchConfig
    from ..index.store import IndexStore
    from ..local import EXTRACTORS

    if args.local not in (*EXTRACTORS, "auto", "none"):
        raise HaflocError(f"--local: unknown extractor {args.local!r}; choose from {', '.join(EXTRACTORS)}, none")
    if args.max_keypoints < 1 or args.local_max_side < 32:
        raise HaflocError("--max-keypoints must be at least 1 and --local-max-side at least 32")
    local = local_spec(
        args.local,
        default_model=args.model in (None, DEFAULT),
        new_index=not (Path(args.index) / "index.json").exists(),
    )
    if local is not None:
        local["conf"] = {"max_keypoints": args.max_keypoints, "max_side": args.local_max_side}

    def factory(files: list[Path]):
        model = load_model(args.model)
        if not args.no_adapt:
            model = adapt_model(model, files, args.index, progress=not args.no_progress)
        n_images = len(files)
        kind = "flat" if args.exact else args.search
        compact = compact_choice(
            args.dim, args.dtype, n_images, model.out_dim, new=not (Path(args.index) / "index.json").exists()
        )
        store = IndexStore.open_or_create(
            args.index,
            model.fingerprint(),
            model.out_dim,
            SearchConfig(kind=kind),
            model_path=recorded_path(model),
            local=local,
            lock_timeout=args.lock_timeout,
            compact=compact,
        )
        return store, model

    code = _index_folder(args, factory)
    if code == 0 and not args.no_calibrate:
        auto_calibrate(args.index, progress=not args.no_progress)
    return code


def compact_choice(dim: int | str | None, dtype: str | None, n_images: int, model_dim: int, new: bool) -> dict | None:
    """The index's representation: what --dim/--dtype ask for; for a new index without them, the
    compact default above COMPACT_THRESHOLD images (or COMPACT_BUDGET bytes of float32), said on stderr."""
    from ..index.compact import COMPACT_BUDGET, COMPACT_DIM, COMPACT_DTYPE, COMPACT_THRESHOLD

    if dim is not None or dtype is not None:  # only what was asked is checked against an existing index
        asked: dict = {} if dim is None else {"dim": None if dim == "full" or dim == model_dim else dim}
        return asked | ({} if dtype is None else {"dtype": dtype})
    floats = n_images * model_dim * 4
    if not new or (n_images <= COMPACT_THRESHOLD and floats <= COMPACT_BUDGET):
        return None
    out = COMPACT_DIM if model_dim > COMPACT_DIM else None
    print(
        f"note: {n_images:,} images x {model_dim:,}-D float32 would take {floats / 1e9:.1f} GB: storing "
        + (f"{out}-D PCA-whitened" if out else f"{model_dim}-D")
        + f" {COMPACT_DTYPE} descriptors "
        "instead (--dim full --dtype float32 keeps them as they are)",
        file=sys.stderr,
    )
    return {"dim": out, "dtype": COMPACT_DTYPE}


def run_add(args) -> int:
    from ..index.locator import open_model_for
    from ..index.store import IndexStore

    def factory(_files: list[Path]):
        store = IndexStore.open(args.index, lock_timeout=args.lock_timeout)
        try:
            return store, open_model_for(store, args.model)
        except BaseException:
            store.close()
            raise

    return _index_folder(args, factory)


def _size(b: float) -> str:
    """Decimal (SI) units, as everywhere in ``index info`` and the build's notes (1 kB = 1000 B)."""
    for unit in ("B", "kB", "MB", "GB"):
        if b < 1000:
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} TB"


def info_lines(info: dict) -> list[str]:
    """The table ``hafloc index info`` prints (also the summary of its --report page)."""
    c = info["counts"]
    lines = [
        f"index      {info['index']}",
        f"images     {c['images']} ({c['positioned']} with a position, {c['unpositioned']} without)",
        "positions  " + ", ".join(f"{k}: {v}" for k, v in info["position_sources"].items()),
        f"model      {info.get('model_path')} (fingerprint {str(info['model_fingerprint'])[:12]})",
    ]
    proj = info.get("projection")
    lines.append(
        f"descriptor {info['dim']}-D {info.get('dtype', 'float32')}"
        + (f" (the model's {proj['input_dim']}-D PCA-whitened, fitted on {proj['fitted_on']} images)" if proj else "")
        + f"; search {info['search'].get('kind')} ({info['footprint']['search']} now)"
    )
    fp = info["footprint"]
    local_now = fp["actual"].get("local_bytes", 0)
    lines.append(
        f"footprint  search RAM ~{_size(fp['estimated']['ram_bytes'])} (files it loads now "
        f"{_size(fp['actual']['ram_bytes'])}); "
        f"disk ~{_size(fp['estimated']['disk_bytes'])} (now {_size(fp['actual']['disk_bytes'])}"
        + (f", of which local features {_size(local_now)}" if local_now else "")
        + ")"
    )
    if info.get("local"):
        loc = info["local"]
        conf = ", ".join(f"{k} {v}" for k, v in sorted(loc.get("conf", {}).items()))
        lines.append(
            f"local      {loc['extractor']} ({conf}); {_size(loc['bytes_per_image'])} per image"
            + ("; re-ranking rule fitted" if info.get("rerank") else "")
        )
    lines += [f"root       {r}" for r in info["roots"]]
    cal = info["calibration"]
    lines.append(
        "calibrated "
        + (
            "no (confidences are heuristic; 'hafloc index calibrate')"
            if cal is None
            else f"no ({cal['reason']})"
            if not cal["usable"]
            else f"within {cal['agree_m']:g} m on {cal['n_samples']} leave-one-out answers, "
            f"held-out ECE {cal['ece_heldout']:.3f} ({cal['created_at']}"
            + (f"; {cal['index_images']} photos then, rerun 'hafloc index calibrate')" if cal["stale"] else ")")
        )
    )
    return lines


def run_info(args) -> int:
    info = index_info(args.index)
    report = None
    if args.report:
        path, missing = write_report(args.index, args.report, info_lines(info))
        report = str(path)
        if missing:
            print(f"hafloc: note: {missing}", file=sys.stderr)
    if args.json:
        if report:
            info["report"] = report
        print_json(info)
        return 0
    for line in info_lines(info):
        print(line)
    if report:
        print(f"report     {report}")
    return 0


def run_export(args) -> int:
    from ..errors import HaflocError

    if args.top_k < 1:
        raise HaflocError(f"--top-k must be at least 1, got {args.top_k}")
    if args.db_pairs < 0:
        raise HaflocError(f"--db-pairs must be 0 (none) or more, got {args.db_pairs}")
    with ExitStack() as held:
        return _export(args, Path(args.output), held)


def _export(args, out: Path, held: ExitStack) -> int:
    import numpy as np

    from ..errors import HaflocError
    from ..fileio import exclusive_folder, write_text_atomic
    from ..images.io import list_images, load_image
    from ..index.hloc_export import retrieval_pairs, write_global_descriptors, write_pairs
    from ..index.locator import open_model_for
    from ..index.store import IndexStore

    qpairs = list_images([args.queries])
    if not qpairs:
        raise HaflocError(f"{args.queries}: no images found")
    with IndexStore.open(args.index) as store:
        model = open_model_for(store, args.model)
        local = store.local_config
        _, db_names, db_desc = store.descriptors()
        rows = store.images()  # id order, as the descriptors
        if len(set(db_names)) != len(db_names):  # one relative name under two roots: use full paths
            db_names = [(Path(r["root"]) / r["path"]).as_posix() for r in rows]
        db_paths = {n: (Path(r["root"]) / r["path"]).resolve() for n, r in zip(db_names, rows)}
        project = store.project  # queries go into the index's space (its projection, if any)
        if len(db_names):
            store.projection()  # loaded while the store is open
    # Two exports into one folder would mix their files: the second is refused while the first
    # runs (a lock on the folder itself, so no lock file is left among the results).
    held.enter_context(
        exclusive_folder(out, "another export is writing to this folder; wait for it or pick another --output")
    )
    res = make_extractor(model, args).extract_paths(
        [p for p, _ in qpairs],
        names=[p.relative_to(root).as_posix() for p, root in qpairs],
        progress=not args.no_progress,
    )
    report_failures(res.failures, len(qpairs))
    if not res.names:
        print("hafloc: error: no query image could be read", file=sys.stderr)
        return 2  # every input was bad
    res.descriptors = project(res.descriptors)
    # hloc keeps database and queries in one feature file keyed by name: a name may be shared
    # only by the very same file (queries taken from the database folder).
    qpath = {p.relative_to(root).as_posix(): p.resolve() for p, root in qpairs}
    clash = [n for n in res.names if n in db_paths and db_paths[n] != qpath[n]]
    if clash:
        raise HaflocError(
            f"query {clash[0]!r} has the name of a different database image; "
            "put the queries in a sub-folder so that names differ"
        )
    q_only = [i for i, n in enumerate(res.names) if n not in db_paths]
    names = list(db_names) + [res.names[i] for i in q_only]
    desc = np.concatenate([db_desc, res.descriptors[q_only]]) if q_only else db_desc
    feats = out / "global-feats-hafloc.h5"
    pairs_path = out / f"pairs-query-hafloc{args.top_k}.txt"
    write_global_descriptors(feats, names, desc, as_half=args.half)
    pairs = retrieval_pairs(
        res.names, res.descriptors, db_names, db_desc, args.top_k, min_score=None if args.keep_negative else 0.0
    )
    write_pairs(pairs_path, pairs)
    db_set = set(db_names)
    dropped = sum(min(args.top_k, len(db_names) - (n in db_set)) for n in res.names) - len(pairs)
    if dropped:
        print(
            f"note: {dropped} candidate(s) with similarity < 0 dropped as hloc's pairs_from_retrieval does "
            "(--keep-negative keeps them)",
            file=sys.stderr,
        )
    write_text_atomic(out / "db.txt", "\n".join(db_names) + "\n", errors="surrogateescape")  # raw name bytes
    write_text_atomic(out / "queries.txt", "\n".join(res.names) + "\n", errors="surrogateescape")
    print(
        f"wrote {feats} ({len(names)} descriptors), {pairs_path} ({len(pairs)} pairs), "
        f"{out / 'db.txt'}, {out / 'queries.txt'}"
    )
    db_pairs: list[tuple[str, str]] = []
    if args.db_pairs:
        db_pairs = retrieval_pairs(
            db_names, db_desc, db_names, db_desc, args.db_pairs, min_score=None if args.keep_negative else 0.0
        )
        db_pairs_path = out / f"pairs-db-hafloc{args.db_pairs}.txt"
        write_pairs(db_pairs_path, db_pairs)
        print(f"wrote {db_pairs_path} ({len(db_pairs)} pairs)")
        if not local:
            print(
                "note: the index holds no local features ('hafloc index build --local'); "
                "extract and match them with hloc for these pairs",
                file=sys.stderr,
            )
    if local:
        from ..index.hloc_export import write_local_exports
        from ..index.rerank import Reranker

        with IndexStore.open(args.index) as store:
            reranker = Reranker(local["extractor"], local.get("conf"))
            qfeat = {n: reranker.features(load_image(qpath[n])) for n in res.names if n not in db_paths}
            fpath, mpath, n_matched = write_local_exports(
                out,
                store,
                reranker.matcher,
                qfeat,
                pairs + db_pairs,
                db_names,
                every_db=bool(args.db_pairs),
                progress=not args.no_progress,
            )
        print(f"wrote {fpath} ({local['extractor']} local features), {mpath} ({n_matched} pairs)")
    return 0


def run_remove(args) -> int:
    from ..errors import HaflocError, printable
    from ..index.store import IndexStore

    if not args.images and not args.missing:
        raise HaflocError("name the images or folders to remove, or pass --missing")
    with IndexStore.open(args.index, lock_timeout=args.lock_timeout) as store:
        ids, unmatched = store.find(args.images)
        missing = store.missing() if args.missing else []
        removed = store.remove(sorted(set(ids) | set(missing))) if ids or missing else 0
        total = len(store)
    for t in unmatched:
        print(f"hafloc: {printable(t)}: not in the index", file=sys.stderr)
    gone = f" ({len(missing)} whose file no longer exists)" if args.missing else ""
    print(
        f"{args.index}: removed {removed} image(s){gone}; index holds {total}; "
        "'hafloc index compact' reclaims their space"
    )
    if unmatched:
        print(
            f"hafloc: {len(unmatched)} of {len(args.images)} named target(s) not in the index, nothing removed "
            "for them",
            file=sys.stderr,
        )
        return 1
    return 0


def run_set_position(args) -> int:
    from ..errors import HaflocError, printable
    from ..index.store import IndexStore

    with IndexStore.open(args.index, lock_timeout=args.lock_timeout) as store:
        if Path(args.image).is_dir():
            raise HaflocError(f"{printable(args.image)}: is a folder; name one image")
        ids, _ = store.find([args.image])
        if not ids:
            raise HaflocError(f"{printable(args.image)}: not in the index {args.index}")
        n = store.set_position(ids, args.lat, args.lon)
    print(f"{printable(args.image)}: position set to {args.lat:.7f}, {args.lon:.7f} ({n} row(s))")
    return 0


def run_verify(args) -> int:
    from ..index.verify import verify_index

    rep = verify_index(args.index, check_model=not args.no_model)
    if args.json:
        print_json(rep)
    else:
        for c in rep["checks"]:
            print(f"{c['status']:<8} {c['check']:<13} {c['detail']}")
        print(
            f"{args.index}: "
            + ("OK" if rep["ok"] else f"DAMAGED ({rep['damage']} check(s))")
            + (f", {rep['warnings']} warning(s)" if rep["warnings"] else "")
        )
    return 0 if rep["ok"] else 1


def run_compact(args) -> int:
    from ..index.store import IndexStore

    with IndexStore.open(args.index, lock_timeout=args.lock_timeout) as store:
        stats = store.compact()
    print(
        f"{args.index}: rewrote {stats['chunks_rewritten']} chunk(s), dropped {stats['stale_rows_dropped']} stale "
        f"row(s), deleted {stats['orphan_chunks_deleted']} chunk(s) no image uses; index holds {stats['images']} "
        "image(s)"
    )
    return 0

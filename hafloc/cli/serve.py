"""``hafloc serve``: a web page and JSON API to locate photos against an index."""

from __future__ import annotations

import os

from .common import add_answer_args, add_backend_args, check_answer_args


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="web page + API: drop a photo, see where it was taken",
        description="Serves GET / (the page: drop a photo, see the estimate on a map of the database "
        "positions, the best matches and the attention maps), POST /locate (multipart "
        "field 'file' -> JSON as 'hafloc locate --json' plus attention overlays), "
        "GET /api/positions, GET /thumbnails/ID (?size=large: a larger one) and GET /health. Runs offline. "
        "The port is taken before the model loads: a busy one is an error at once.",
    )
    p.add_argument("--index", required=True, help="index folder (from 'hafloc index build')")
    p.add_argument("--model", help="model file (default: the one the index was built with)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default 20 MB)")
    p.add_argument(
        "--max-megapixels",
        type=float,
        default=40.0,
        help="largest accepted photo in decoded pixels (default 40 MP; a small PNG can hold far more)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("HAFLOC_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' on the API (default: env HAFLOC_TOKEN, else none)",
    )
    p.add_argument("--top-k", type=int, default=10, help="matches per photo (default 10)")
    add_answer_args(p)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes behind the one port (default 1). Memory: each worker loads its own copy "
        "of the model (the default model: about 0.5 GB), while the index's search structure is "
        "memory-mapped read-only and shared by all of them; --threads defaults to the cores divided "
        "by N. A worker that dies (killed, out of memory) is restarted while the others answer; the requests "
        "it had accepted are lost (their connections close without an answer: POST /locate changes nothing, "
        "so a client may retry it). See docs/SCALING.md",
    )
    p.add_argument(
        "--inference-threads",
        type=int,
        default=1,
        metavar="T",
        help="photos described at once per process (default 1; each already uses --threads cores)",
    )
    p.add_argument(
        "--tiles",
        metavar="URL",
        help="map tiles under the page's map, as a URL template the browser fetches, e.g. "
        "https://tile.openstreetmap.org/{z}/{x}/{y}.png (default: none, a plain coordinate grid; "
        "the page then needs no network)",
    )
    p.add_argument(
        "--tiles-attribution",
        metavar="TEXT",
        help="credit line for the tiles, e.g. '(c) OpenStreetMap contributors' (default: the tile host)",
    )
    add_backend_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import HaflocError
    from ..index.locator import Locator, LocatorConfig
    from ..serve.app import check_tile_url, create_app
    from ..serve.workers import listen, run_one, run_workers, settings_json, threads_per_worker

    if args.max_upload_mb <= 0:
        raise HaflocError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.workers < 1:
        raise HaflocError(f"--workers must be 1 or more (server processes), got {args.workers}")
    if args.inference_threads < 1:
        raise HaflocError(f"--inference-threads must be 1 or more, got {args.inference_threads}")
    if args.max_megapixels <= 0:
        raise HaflocError(f"--max-megapixels must be positive, got {args.max_megapixels}")
    check_answer_args(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        print("warning: serving on a public address without --token: anyone who can reach it may use it")
    if args.tiles:
        check_tile_url(args.tiles)  # before the model loads: a typo should cost nothing
    sock = listen(args.host, args.port)  # a busy port, too, before the model loads and before "serving"
    threads = threads_per_worker(args.workers, args.threads)
    lc = LocatorConfig(
        backend=args.backend,
        batch_size=args.batch_size,
        max_side=args.max_side,
        rerank=args.rerank,
        num_threads=threads,
        min_confidence=args.min_confidence,
    )
    app_kwargs = dict(
        max_upload_mb=args.max_upload_mb,
        token=args.token,
        model_path=str(args.model) if args.model else None,
        top_k=args.top_k,
        inference_threads=args.inference_threads,
        tiles=args.tiles,
        tiles_attribution=args.tiles_attribution,
        max_pixels=int(args.max_megapixels * 1e6),
    )
    where = f"http://{args.host}:{args.port}/"
    with sock:
        if args.workers == 1:
            app = create_app(args.index, locator_config=lc, **app_kwargs)
            print(f"hafloc: serving {args.index} on {where} (Ctrl-C to stop)", flush=True)
            return run_one(app, sock)
        # everything a worker will load, checked once here: a wrong model or a damaged index is one clear
        # error now rather than N workers failing (the model is freed again before the workers start)
        Locator(args.index, args.model, lc, read_only=True).close()
        print(
            f"hafloc: serving {args.index} on {where} with {args.workers} worker processes, {threads} threads "
            "each (Ctrl-C to stop)",
            flush=True,
        )
        return run_workers(settings_json(args.index, lc, threads, **app_kwargs), sock, args.workers)

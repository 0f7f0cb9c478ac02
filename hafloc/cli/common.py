"""Helpers shared by subcommands."""

from __future__ import annotations

import json
import sys


def add_backend_args(p) -> None:
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="inference engine: ONNX Runtime is 2.5-4x faster on CPU; auto = ONNX Runtime when installed",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="resize so the longest side is about this many pixels (multiples of 32; default: the model's)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def add_ray_args(p) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="describe the images on a Ray cluster: ADDRESS = HOST:PORT of 'ray start --head' (or "
        "ray://HOST:PORT, or auto: the cluster started on this machine); without ADDRESS a local Ray "
        "instance with one CPU per core of this machine. One actor per --threads CPUs (default 1), "
        "each loading the model once; the results are committed here as without --ray. Images and the "
        "model must be at the same path on every node (a shared filesystem). Needs the 'ray' extra "
        "(pip install 'hafloc[ray]'). Put it after the positional arguments, or write --ray=ADDRESS",
    )
    p.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        metavar="N",
        help="with --ray: number of actors (default: the cluster's CPUs / --threads)",
    )


def ray_pool(args, model, paths, local=None):
    """The ``--ray`` actor pool for ``model`` (loaded here from its file, so its path is known), checked
    against ``paths``; close it (a context manager) when done."""
    from pathlib import Path

    from ..errors import HaflocError
    from ..index.distributed import DescribeSpec, start_pool, warm_onnx_cache

    src = getattr(model, "source_path", None)
    if not src:
        raise HaflocError("--ray needs a model file the workers can load")
    if args.threads is not None and args.threads < 1:
        raise HaflocError(f"--threads must be at least 1, got {args.threads}")
    warm_onnx_cache(model, args.backend)
    spec = DescribeSpec(
        str(Path(src).resolve()),
        model.fingerprint(),
        batch_size=args.batch_size,
        max_side=args.max_side,
        backend=args.backend,
        threads=args.threads or 1,
        local=local,
    )
    return start_pool(spec, paths, args.ray, args.ray_actors, quiet=getattr(args, "no_progress", False))


def add_answer_args(p) -> None:
    """How ``locate`` and ``serve`` answer: re-ranking depth and the confidence below which they say "unknown"."""
    p.add_argument(
        "--rerank",
        type=int,
        default=None,
        metavar="K",
        help="re-rank the top K matches by geometrically verified local matches (default 10 when the "
        "index stores local features, see 'index build --local'; 0 = global similarity only)",
    )
    p.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        metavar="P",
        help="answer 'unknown' (JSON: estimate null, unknown.reason) when the confidence is below P",
    )


def check_answer_args(args) -> None:
    """``add_answer_args`` values, checked before anything loads (a typo should cost nothing)."""
    from ..errors import HaflocError

    if args.min_confidence is not None and not 0.0 <= args.min_confidence <= 1.0:
        raise HaflocError(f"--min-confidence must lie in [0, 1], got {args.min_confidence}")
    if args.rerank is not None and args.rerank < 0:
        raise HaflocError(f"--rerank must be 0 or more, got {args.rerank}")


def make_extractor(model, args):
    from ..descriptors.extract import Extractor

    return Extractor(
        model, batch_size=args.batch_size, max_side=args.max_side, backend=args.backend, num_threads=args.threads
    )


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def report_failures(failures: list[tuple[str, str]], total: int) -> None:
    if failures:
        print(f"skipped {len(failures)} of {total} file(s):", file=sys.stderr)
        for name, reason in failures:
            print(f"  {name}: {reason}", file=sys.stderr)

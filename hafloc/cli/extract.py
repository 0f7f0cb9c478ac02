"""``hafloc extract``: images -> global descriptors (.npz or hloc .h5)."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import add_backend_args, add_ray_args, make_extractor, ray_pool, report_failures


def register(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="compute global descriptors of images (files or folders)",
        description="Extracts one L2-normalised global descriptor per image. Writes .npz (arrays "
        "'names' - paths relative to the folder given - and 'descriptors') or .h5 in "
        "hloc's layout (a group per image holding 'global_descriptor'). Unreadable files "
        "are skipped and listed; an interrupted run resumes where it stopped.",
    )
    p.add_argument("--model", required=True, help="model file (from 'hafloc model init' or 'hafloc train')")
    p.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--output", required=True, help="OUT.npz or OUT.h5")
    add_backend_args(p)
    add_ray_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--checkpoint-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="save finished descriptors this often, so a killed run resumes (default 30)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..descriptors.extract import extract_to_file
    from ..descriptors.modelfile import load_model
    from ..errors import HaflocError

    out = Path(args.output)
    if out.suffix not in (".npz", ".h5", ".hdf5"):
        raise HaflocError(f"{out}: --output must end in .npz or .h5")
    model = load_model(args.model)
    if args.ray:
        from ..images.io import list_images
        from ..index.distributed import RayExtractor

        pairs = list_images(args.paths)
        if not pairs:  # before starting a cluster
            raise HaflocError("no images found in " + ", ".join(map(str, args.paths)))
        with ray_pool(args, model, [p for p, _ in pairs]) as pool:
            res = extract_to_file(
                RayExtractor(pool, model),
                args.paths,
                out,
                progress=not args.no_progress,
                checkpoint_every=args.checkpoint_every,
            )
    else:
        res = extract_to_file(
            make_extractor(model, args),
            args.paths,
            out,
            progress=not args.no_progress,
            checkpoint_every=args.checkpoint_every,
        )
    total = len(res.names) + len(res.failures)
    report_failures(res.failures, total)
    if not res.names:
        print("hafloc: error: no image could be read", file=sys.stderr)
        return 2  # every input was bad
    print(f"wrote {out}: {len(res.names)} descriptors of {res.descriptors.shape[1]}-D")
    return 0

"""``hafloc model init|info``: build a model on the pretrained backbone; inspect a model file."""

from __future__ import annotations

import json
import time
from typing import Any

from ..heads import METHODS
from .common import print_json


def register(sub) -> None:
    p = sub.add_parser(
        "model",
        help="build (init) a model or inspect (info) a model file",
        description="Build a model on a pretrained backbone and fit its clusters / whitening, "
        "or print what a model file holds.",
    )
    msub = p.add_subparsers(dest="model_command", metavar="ACTION")
    pi = msub.add_parser(
        "init",
        help="build a model and fit its clusters (and whitening) on images",
        description="Builds METHOD on the pretrained backbone, initialises projections by PCA and "
        "VLAD clusters by k-means on local features sampled from --images, and fits PCA "
        "whitening when --dim is given. Writes one model file.",
    )
    pi.add_argument("--method", default="haf", choices=METHODS, help="haf (the paper; default), or a baseline")
    pi.add_argument(
        "--images", required=True, nargs="+", help="image files or folders (searched recursively) to fit on"
    )
    pi.add_argument("--output", required=True, help="model file to write (e.g. haf.model)")
    pi.add_argument("--backbone", default=None, help="efficientnet-lite0 (default), efficientnet-lite2 or vgg16")
    pi.add_argument(
        "--backbone-weights",
        default=None,
        help="state-dict file for the backbone (required for vgg16: torchvision format; "
        "optional for superpoint: the released superpoint_v1.pth)",
    )
    pi.add_argument(
        "--dim", default="none", help="PCA-whitened output dimension, e.g. 256 or 4096, or 'none' (default)"
    )
    pi.add_argument("--clusters", type=int, default=None, help="VLAD clusters per level (default 64)")
    pi.add_argument(
        "--proj-dim", type=int, default=None, help="HAF: channels per level after the 1x1 projection (default 128)"
    )
    pi.add_argument("--max-side", type=int, default=640, help="longest image side used by this model (default 640)")
    pi.add_argument(
        "--fit-images", type=int, default=300, help="at most this many images for the clusters (default 300)"
    )
    pi.add_argument("--seed", type=int, default=0)
    pi.add_argument("--no-progress", action="store_true", help="no progress bar")
    pi.set_defaults(func=run_init)
    pf = msub.add_parser(
        "info",
        help="print a model file's configuration, taps, sizes and fingerprint",
        description="For a model file: configuration, taps, sizes and fingerprint. For an .onnx "
        "file (from 'hafloc export-onnx'): inputs, outputs and how to feed it "
        "(size rule, colour order, range, normalisation) from its metadata.",
    )
    pf.add_argument(
        "model",
        nargs="?",
        default="default",
        help="model file, or an exported .onnx file (default: 'default', the shipped model, with its model card)",
    )
    pf.add_argument("--json", action="store_true", help="machine-readable output")
    pf.set_defaults(func=run_info)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def run_init(args) -> int:
    import numpy as np

    from ..descriptors.fit import fit_clusters, fit_whitening
    from ..descriptors.modelfile import save_model
    from ..descriptors.network import GeoLocNet, ModelConfig
    from ..errors import HaflocError
    from ..images.io import list_images

    dim = None if str(args.dim).lower() in ("none", "0", "") else int(args.dim)
    config = ModelConfig.for_method(args.method, args.backbone, num_clusters=args.clusters, proj_dim=args.proj_dim)
    config.max_side = args.max_side
    t0 = time.time()
    import torch

    torch.manual_seed(args.seed)  # the heads' fresh layers: same seed, same model file
    model = GeoLocNet(config, pretrained=True, backbone_weights=args.backbone_weights)
    paths = [p for p, _ in list_images(args.images)]
    if not paths:
        raise HaflocError("no images found in " + ", ".join(args.images))
    rng = np.random.default_rng(args.seed)
    fit_paths = (
        paths
        if len(paths) <= args.fit_images
        else [paths[i] for i in sorted(rng.choice(len(paths), args.fit_images, replace=False))]
    )
    meta: dict[str, Any] = {
        "fit": fit_clusters(model, fit_paths, seed=args.seed, progress=not args.no_progress),
        "fit_images": [str(p) for p in fit_paths[:5]],
    }
    if dim:
        meta["whitening"] = fit_whitening(model, paths, dim, seed=args.seed, progress=not args.no_progress)
    meta["seconds"] = round(time.time() - t0, 1)
    save_model(model.eval(), args.output, meta=meta)
    print(
        f"wrote {args.output}: {args.method} on {config.backbone}, descriptor {model.out_dim}-D, "
        f"fingerprint {model.fingerprint()} ({meta['seconds']} s)"
    )
    return 0


def run_info(args) -> int:
    from pathlib import Path

    if Path(args.model).suffix.lower() == ".onnx":
        from ..descriptors.onnx_backend import onnx_info

        info = onnx_info(args.model)
    else:
        from ..descriptors.modelfile import model_info

        info = model_info(args.model)
    if args.json:
        print_json(info)
        return 0
    card = info.get("meta", {}).get("card") if isinstance(info.get("meta"), dict) else None
    for key, value in info.items():
        if key == "meta" and card:
            continue  # printed below as the model card
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        print(f"{key:>16}: {value}")
    if card:
        print_card(card)
    return 0


def print_card(card: dict) -> None:
    """The model card: what the model learned from, how, and what it scores on each set."""
    print("\nmodel card")
    for key, value in card.items():
        if key == "metrics":
            continue
        print(f"{key:>16}: {value if isinstance(value, str) else json.dumps(value)}")
    metrics = card.get("metrics") or {}
    if metrics:
        nan = float("nan")
        print(
            f"\n{'set':<16} {'metric':<6} {'untrained':>9} {'as shipped':>10} {'adapted':>8} {'as built':>8}  "
            "as built - untrained, 95% interval"
        )
        for name, m in metrics.items():
            print(
                f"{name:<16} {m.get('metric', ''):<6} {m.get('untrained', nan):>9.1f} {m.get('model', nan):>10.1f} "
                f"{m.get('adapted', nan):>8.1f} {m.get('as_built', nan):>8.1f}  {m.get('as_built_vs_untrained', '')}"
            )

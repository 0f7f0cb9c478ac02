"""``hafloc tune-weights``: re-tune HAF's fusion weights w1..w3 on a validation split (paper, Table 2)."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser(
        "tune-weights",
        help="grid-search HAF's fusion weights for the best val recall@5 and store them",
        description="Extracts each level's descriptor once, scores every weight triple on the simplex grid "
        "(similarity = sum_l w_l cos_l), keeps the best recall@5 (ties: closest to uniform, then "
        "recall@1), writes the weights into the model file and a Table-2 style table "
        "(markdown, JSON, PNG). A whitened model is refitted on the dataset's train split "
        "(or marked stale when it has none).",
    )
    p.add_argument("--model", required=True, help="model file (changed in place unless --save-as)")
    p.add_argument("--dataset", required=True, help="dataset folder or ground-truth file")
    p.add_argument("--format", default=None, help="dataset layout (default: detected)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="split to tune on (default val)")
    p.add_argument("--step", type=float, default=0.1, help="grid step on the simplex (default 0.1)")
    p.add_argument(
        "--image-size",
        default=None,
        help="fixed HxW (default: the training size stored in the model, else the model's max side, aspect kept)",
    )
    p.add_argument("--max-side", type=int, default=None, help="longest image side (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--output",
        default=None,
        metavar="TABLE_DIR",
        help="folder for weights.md / weights.json / weights.png (rows of other datasets are kept)",
    )
    p.add_argument("--save-as", default=None, help="write the tuned model here instead of overwriting --model")
    p.add_argument("--no-save", action="store_true", help="only report; leave the model file alone")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..datasets.detect import load_dataset
    from ..descriptors.modelfile import load_model, read_model_file, save_model
    from ..errors import HaflocError, InputError
    from ..train.config import parse_image_size
    from ..train.tune import tune_fusion_weights, write_weights_table

    model = load_model(args.model)
    ds = load_dataset(args.dataset, args.format, split=args.split)
    whitening_paths = None
    if model.whitening.dim and not args.no_save:
        try:
            whitening_paths = load_dataset(args.dataset, args.format, split="train").db_paths()[:10_000]
        except (HaflocError, InputError, ValueError):
            whitening_paths = None
    trained_size = (model.meta.get("trained") or {}).get("image_size")
    # a trained model is tuned at the size it was trained and validated at, unless told otherwise
    asked = args.image_size or trained_size
    size = parse_image_size(asked) if asked and not args.max_side else None
    res = tune_fusion_weights(
        model,
        ds,
        step=args.step,
        image_size=size,
        max_side=args.max_side,
        batch_size=args.batch_size,
        apply=not args.no_save,
        whitening_paths=whitening_paths,
    )
    if not args.no_save:
        meta = read_model_file(args.model).get("meta", {})
        meta["fusion_tuning"] = {
            k: res[k] for k in ("dataset", "weights", "recall@1", "recall@5", "step", "previous_weights", "whitening")
        }
        save_model(model, args.save_as or args.model, meta=meta)
    if args.output:
        write_weights_table(res, args.output)
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "grid"}, indent=2))
    else:
        w = "/".join(f"{x:g}" for x in res["weights"])
        prev = "/".join(f"{x:.2f}" for x in res["previous_weights"])
        print(
            f"{res['dataset']}: best w = {w} -> R@1 {res['recall@1']:.2f} R@5 {res['recall@5']:.2f} "
            f"(was {prev}: R@5 {res['previous'].get('recall@5', float('nan')):.2f}; {len(res['grid'])} grid points)"
        )
        if res["whitening"] == "stale":
            print("warning: the whitening was fitted with the old weights (no train split to refit it on)")
        if not args.no_save:
            print(f"stored in {args.save_as or args.model}")
    return 0

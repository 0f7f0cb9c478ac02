"""``hafloc eval``: one model on one benchmark -> metrics table, JSON, optional HTML report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .common import add_backend_args

if TYPE_CHECKING:  # the metrics stack loads when a command runs, not when the parser is built
    from ..metrics.evaluate import EvalResult


def add_dataset_args(p) -> None:
    from ..datasets.detect import FORMATS

    p.add_argument(
        "--dataset",
        required=True,
        help="dataset folder or ground-truth file (.mat, .npz, .pkl, a label .csv, ...); layout detected",
    )
    p.add_argument(
        "--format",
        choices=sorted(FORMATS),
        default=None,
        help="dataset layout, when detection guesses wrong: " + "; ".join(f"{k} = {v[1]}" for k, v in FORMATS.items()),
    )
    p.add_argument(
        "--split", choices=["train", "val", "test"], default="test", help="which split to score (default test)"
    )
    p.add_argument(
        "--cache", default=None, help="descriptor cache folder (default $HAFLOC_CACHE or ~/.cache/hafloc/descriptors)"
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the descriptor cache")
    add_backend_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model on a benchmark (recall@N, mAP) with its published protocol",
        description="Extracts database and query descriptors (cached per model and settings, so a rerun is "
        "instant), ranks the database for every query and scores with the dataset's protocol: "
        "recall@1/5/10 at 25 m or by label (Pittsburgh, Tokyo 24/7, '@' folders, label CSVs, ...), "
        "mAP with full and cropped queries (Oxford5k / Paris6k), E/M/H (revisited), mAP (Holidays). "
        "Unreadable images are skipped and listed; failed queries count as misses.",
    )
    p.add_argument("--model", required=True, help="model file (from 'hafloc model init' or 'hafloc train')")
    add_dataset_args(p)
    p.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="K",
        help="re-rank each query's top K by geometrically verified local matches and show global and "
        "re-ranked scores side by side (default 0: global only); local features of queries and "
        "retrieved candidates are computed once and cached beside the descriptor cache",
    )
    p.add_argument(
        "--local",
        default="xfeat",
        metavar="EXTRACTOR",
        help="local features for --rerank (xfeat, disk, aliked, superpoint; default xfeat)",
    )
    p.add_argument(
        "--max-keypoints", type=int, default=1024, help="local features per image for --rerank (default 1024)"
    )
    p.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="write the results as JSON to FILE; its configuration goes beside it, in FILE's folder "
        "(r.json -> r.config.json)",
    )
    p.add_argument(
        "--report",
        default=None,
        help="write an HTML report folder: recall curve, example retrievals, attention maps, results",
    )
    p.set_defaults(func=run)


def rerank_from_args(args):
    """RerankSettings for --rerank K (None when K is 0)."""
    if not getattr(args, "rerank", 0):
        return None
    from ..errors import HaflocError
    from ..local import EXTRACTORS
    from ..metrics.verified import RerankSettings

    if args.rerank < 0:
        raise HaflocError(f"--rerank must be 0 or more, got {args.rerank}")
    if args.local not in EXTRACTORS:
        raise HaflocError(f"--local: unknown extractor {args.local!r}; choose from {', '.join(EXTRACTORS)}")
    return RerankSettings(k=args.rerank, extractor=args.local, conf={"max_keypoints": args.max_keypoints})


def settings_from_args(args):
    from ..metrics.evaluate import ExtractionSettings

    return ExtractionSettings(
        batch_size=args.batch_size, max_side=args.max_side, backend=args.backend, num_threads=args.threads
    )


def cache_from_args(args):
    return False if args.no_cache else (Path(args.cache) if args.cache else None)


def load_dataset_from_args(args):
    from ..datasets.detect import load_dataset
    from ..errors import InputError

    try:
        return load_dataset(args.dataset, format=args.format, split=args.split)
    except (ValueError, KeyError, IndexError, TypeError) as err:
        # a reader that trips over content it did not expect: still one line naming the file
        raise InputError(args.dataset, f"cannot read as {args.format or 'a dataset'} ({err})") from None


def model_summary(model, path: str) -> dict[str, Any]:
    return {
        "file": str(path),
        "fingerprint": model.fingerprint(),
        "method": model.config.method,
        "backbone": model.config.backbone,
        "descriptor_dim": int(model.out_dim),
        "whitening": model.whitening.dim,
        "max_side": model.config.max_side,
        "fusion_weights": [round(float(w), 4) for w in model.head.fusion_weights().detach()]
        if hasattr(model.head, "fusion_weights")
        else None,
        "config": model.config.to_dict(),
    }


def run_config(models: list[dict], ds, settings, args, command: str) -> dict[str, Any]:
    """config.json: what produced a result (models, dataset, extraction settings)."""
    import dataclasses
    import time

    from .._version import __version__

    return {
        "command": command,
        "hafloc": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "models": models,
        "dataset": {**ds.summary(), "path": str(args.dataset), "split": args.split},
        "settings": dataclasses.asdict(settings),
        "argv": sys.argv[1:],
    }


def table_rows(name: str, result: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    from ..metrics.evaluate import headline

    suffix = f" +rerank {result['rerank']['k']}" if result.get("rerank") else ""
    row = {
        "method": name + suffix,
        **{_label(k): v for k, v in headline(result).items()},
        "queries": result["num_queries"],
        "dim": result["descriptor_dim"],
    }
    return row, list(row)


def result_rows(name: str, result: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The table rows of one evaluation: global, then re-ranked when it was re-ranked."""
    row, cols = table_rows(name, result)
    if not result.get("rerank"):
        return [row], cols
    glob = {c: result.get("global_" + k, row[c]) for c, k in zip(cols, [_key(c) for c in cols])}
    glob["method"] = name
    return [glob, row], cols


def _key(label: str) -> str:
    return label.replace("R@", "recall@")


def _label(key: str) -> str:
    return key.replace("recall@", "R@")


def json_result(result: EvalResult, config: dict[str, Any]) -> dict[str, Any]:
    out = result.to_json()
    out["config"] = config
    return out


def write_json(path: Path, obj: dict[str, Any], config: dict[str, Any], config_name: str = "config.json") -> None:
    """``obj`` to ``path`` and ``config`` beside it (in the same folder, whatever the current one)."""
    from ..fileio import write_json_atomic

    write_json_atomic(path, obj)
    write_json_atomic(path.parent / config_name, config)


def config_beside(path: Path) -> str:
    """The config file name for a result file of the user's choice: ``r.json`` -> ``r.config.json``,
    so that it never replaces another ``config.json`` in that folder (or another result's)."""
    return f"{path.stem if path.suffix.lower() == '.json' else path.name}.config.json"


def without_positive_note(result: Mapping[str, Any], metric: str) -> str | None:
    """What happened to queries without a positive, in the protocol's terms (None when there are none).

    Recall protocols count them as misses; mAP protocols (Oxford/Paris, revisited E/M/H, Holidays)
    leave them out of the mean, as revisitop's ``compute_map`` does.
    """
    nwp = result.get("num_queries_without_positive") or 0
    if isinstance(nwp, dict):  # revisited: one count per protocol (E/M/H)
        if not any(nwp.values()):
            return None
        counts = ", ".join(f"{v} in {k}" for k, v in nwp.items() if v)
        return f"queries without a positive in the database ({counts}): skipped as the protocol does"
    if not nwp:
        return None
    if metric == "recall":
        return f"{nwp} queries have no positive in the database (counted as misses)"
    return f"{nwp} queries have no positive in the database: skipped as the protocol does"


def print_failures(result: Mapping[str, Any]) -> None:
    fails = result.get("failures") or []
    if fails:
        print(
            f"skipped {len(fails)} unreadable image(s) ({result['num_db_failed']} database dropped, "
            f"{result['num_queries_failed']} queries counted as misses):",
            file=sys.stderr,
        )
        for path, reason in fails[:20]:
            print(f"  {path}: {reason}", file=sys.stderr)
        if len(fails) > 20:
            print(f"  ... and {len(fails) - 20} more (see the JSON)", file=sys.stderr)


def run(args) -> int:
    from ..descriptors.modelfile import load_model
    from ..metrics.evaluate import evaluate
    from ..reports import markdown_table

    ds = load_dataset_from_args(args)
    model = load_model(args.model)
    settings = settings_from_args(args)
    extractor = settings.extractor_for(model, ds)
    result = evaluate(
        model,
        ds,
        settings,
        cache_dir=cache_from_args(args),
        progress=not args.no_progress,
        extractor=extractor,
        rerank=rerank_from_args(args),
    )
    name = Path(args.model).stem
    config = run_config([model_summary(model, args.model)], ds, settings, args, "eval")
    rows, cols = result_rows(name, result)
    print(f"{ds.name} ({ds.num_db} database, {ds.num_q} queries) - {result['protocol']}")
    print(markdown_table(rows, cols), end="")
    if result.get("rerank"):
        t = result["rerank"]["seconds_per_query"]
        print(
            f"re-ranking ({result['rerank']['extractor']}, top {result['rerank']['k']}): "
            f"{t['query_features']:.3f} s query features + {t['matching']:.3f} s matching per query "
            f"(+ {t['db_features']:.3f} s database features, cached)"
        )
    c = result["cache"]
    print(f"descriptors: {c['extracted']} extracted, {c['reused']} from cache; {result['timing']['total_s']:.1f} s")
    note = without_positive_note(result, ds.metric)
    if note:
        print(f"note: {note}")
    print_failures(result)
    out = json_result(result, config)
    if args.json:
        json_path = Path(args.json)
        write_json(json_path, out, config, config_beside(json_path))
        print(f"wrote {args.json} and {json_path.parent / config_beside(json_path)}")
    if args.report:
        index = write_eval_report(Path(args.report), model, ds, result, out, config, name, extractor)
        print(f"wrote {index}")
    return 0


def _query_image(ds, extractor, qi: int, crop: bool):
    """Query ``qi`` as the model saw it (EXIF per protocol, crop box when cropped)."""
    import numpy as np

    box = tuple(np.asarray(ds.quirks.crop_boxes)[qi]) if crop and ds.quirks.crop_boxes is not None else None
    return extractor.load(ds.q_paths()[qi], box)


def write_retrieval_examples(out_dir: Path, ds, result: EvalResult, extractor, count: int = 4, top: int = 5) -> list:
    """A few queries with their top retrievals, right ones first then wrong ones (green/red frames)."""
    import numpy as np

    from ..errors import InputError
    from ..reports import ReportImage, plot_retrievals

    sub = result.dataset  # ranks index into this (failed images removed)
    positives = [set(p.tolist()) for p in sub.query_positives()]
    rows = []
    for qi, row in enumerate(result.ranks):
        if sub.junk is not None:
            row = row[~np.isin(row, sub.junk[qi])]
        rows.append([int(r) for r in row if r >= 0][:top])
    right = [i for i, r in enumerate(rows) if r and r[0] in positives[i]]
    wrong = [i for i, r in enumerate(rows) if not (r and r[0] in positives[i])]
    picks = right[: (count + 1) // 2] + wrong[: count // 2]
    picks += [i for i in right + wrong if i not in picks][: count - len(picks)]
    crop = bool(sub.quirks.crop_queries)
    images = []
    for n, qi in enumerate(picks):
        row = rows[qi]
        pos = positives[qi]
        if not row:
            continue
        try:
            q_img = _query_image(sub, extractor, qi, crop)
            db_imgs = [extractor.load(sub.db_paths()[r]) for r in row]
        except InputError:
            continue
        for im in [q_img] + db_imgs:
            im.thumbnail((480, 480))
        flags = [r in pos for r in row]
        name = f"retrieval_{n + 1}.png"
        plot_retrievals(q_img, db_imgs, flags, out_dir / name)
        verdict = "right" if flags and flags[0] else "wrong"
        images.append(
            ReportImage(
                name, f"query {sub.q_images[qi]}: top-{len(row)} ({verdict} at rank 1; green = correct, red = wrong)"
            )
        )
    return images


def write_eval_report(
    out_dir: Path, model, ds, result: EvalResult, out: dict[str, Any], config: dict[str, Any], name: str, extractor
) -> Path:
    """The eval report folder: results.json, config.json, recall curve, retrievals, attention, index.html."""
    from ..reports import ReportImage, Section, Table, plot_attention, plot_recall_curves, write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", out, config)
    rows, cols = result_rows(name, result)
    sections = [
        Section(
            "Results",
            paragraphs=[
                f"Dataset {ds.name}: {ds.num_db} database and {ds.num_q} query images. Protocol: {result['protocol']}.",
                f"Model {name} ({model.config.method} on {model.config.backbone}, {result['descriptor_dim']}-D, "
                f"fingerprint {result['fingerprint']}).",
                f"Queries without a positive: {without_positive_note(result, ds.metric) or 'none'}. Unreadable images "
                f"skipped: {len(result['failures'])}. Extraction {result['timing']['extract_s']:.1f} s "
                f"({result['cache']['extracted']} extracted, {result['cache']['reused']} from the cache).",
            ],
            tables=[Table(rows, cols)],
        )
    ]
    if result.get("recall_curve"):
        thr = ds.pos_threshold if ds.db_utm is not None else None
        curves = {name: result["recall_curve"]}
        if result.get("global_recall_curve"):
            curves = {name: result["global_recall_curve"], rows[-1]["method"]: result["recall_curve"]}
        plot_recall_curves(curves, out_dir / "recall_curve.png", title=ds.name, threshold_m=thr)
        sections.append(Section("Recall@N", images=[ReportImage("recall_curve.png", "recall@N, N = 1..25")]))
    examples = write_retrieval_examples(out_dir, ds, result, extractor)
    if examples:
        sections.append(Section("Example retrievals", images=examples))
    sub = result.dataset
    if sub.num_q:
        from ..errors import InputError

        try:
            img = _query_image(sub, extractor, 0, bool(sub.quirks.crop_queries))
            att = extractor.describe_image(img)["attention"]
        except InputError:
            att = {}
        if att:
            plot_attention(img, att, out_dir / "attention.png", strides=dict(model.backbone.strides))
            sections.append(
                Section(
                    "Attention",
                    images=[ReportImage("attention.png", f"attention maps of query {sub.q_images[0]} per level")],
                )
            )
    sections.append(Section("Configuration", pre=json.dumps(config, indent=2), pre_caption="config.json"))
    return write_report(out_dir, f"hafloc eval: {name} on {ds.name}", sections)

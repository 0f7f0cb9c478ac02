"""``hafloc compare``: several models on one benchmark -> one table, one recall plot, one report."""

from __future__ import annotations

import json
from pathlib import Path

from .eval import (
    add_dataset_args,
    cache_from_args,
    load_dataset_from_args,
    model_summary,
    print_failures,
    run_config,
    settings_from_args,
    table_rows,
    write_json,
)


def register(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="score several models on one benchmark: one table and one recall@N plot",
        description="Evaluates every model like 'hafloc eval' (sharing the descriptor cache) and writes the "
        "paper's Table 1 / Fig. 3 layout: results.md and results.json (a row per method), "
        "recall_curves.png (a curve per method), config.json and index.html in --output.",
    )
    p.add_argument("--models", required=True, nargs="+", help="model files")
    p.add_argument("--names", nargs="+", default=None, help="method names for the table/plot (default: file names)")
    add_dataset_args(p)
    p.add_argument("--output", default=None, help="result folder (default compare-<dataset>)")
    p.set_defaults(func=run)


def method_names(models: list[str], names: list[str] | None) -> list[str]:
    from ..errors import HaflocError

    if names is not None:
        if len(names) != len(models):
            raise HaflocError(f"--names gives {len(names)} names for {len(models)} models")
        out = list(names)
    else:
        out = [Path(m).stem for m in models]
    if len(set(out)) != len(out):  # two 'model.pt' in different folders: keep the rows apart
        out = [f"{n} ({i + 1})" for i, n in enumerate(out)]
    return out


def run(args) -> int:
    from ..descriptors.modelfile import load_model, read_model_file
    from ..fileio import write_text_atomic
    from ..metrics.evaluate import evaluate
    from ..reports import ReportImage, Section, Table, markdown_table, plot_recall_curves, write_report

    names = method_names(args.models, args.names)
    ds = load_dataset_from_args(args)
    for m in args.models:  # a bad file should fail now, not after an hour of extraction
        read_model_file(m)
    settings = settings_from_args(args)
    out_dir = Path(args.output or f"compare-{ds.name}")
    rows, results, summaries, curves = [], {}, [], {}
    cols: list[str] = []
    for name, path in zip(names, args.models):
        model = load_model(path)
        print(f"== {name}: {model.config.method} on {model.config.backbone}")
        result = evaluate(model, ds, settings, cache_dir=cache_from_args(args), progress=not args.no_progress)
        print_failures(result)
        row, row_cols = table_rows(name, result)
        rows.append(row)
        cols += [c for c in row_cols if c not in cols]
        summaries.append({"name": name, **model_summary(model, path)})
        results[name] = result
        if result.get("recall_curve"):
            curves[name] = result["recall_curve"]
        del model
    config = run_config(summaries, ds, settings, args, "compare")
    head = f"{ds.name} ({ds.num_db} database, {ds.num_q} queries) - {next(iter(results.values()))['protocol']}"
    table = markdown_table(rows, cols)
    print(head)
    print(table, end="")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "results.md", f"{head}\n\n{table}")
    write_json(
        out_dir / "results.json",
        {
            "dataset": ds.summary(),
            "table": rows,
            "results": {n: r.to_json() for n, r in results.items()},
            "config": config,
        },
        config,
    )
    sections = [Section("Results", paragraphs=[head], tables=[Table(rows, cols)])]
    if curves:
        thr = ds.pos_threshold if ds.db_utm is not None else None
        plot_recall_curves(curves, out_dir / "recall_curves.png", title=ds.name, threshold_m=thr)
        sections.append(Section("Recall@N", images=[ReportImage("recall_curves.png", "recall@N per method")]))
    sections.append(Section("Configuration", pre=json.dumps(config, indent=2), pre_caption="config.json"))
    index = write_report(out_dir, f"hafloc compare on {ds.name}", sections)
    print(f"wrote {out_dir / 'results.md'}, {out_dir / 'results.json'}, {index}")
    return 0

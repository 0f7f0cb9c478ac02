"""Trained models vs the untrained HAF, on real street views (test splits) and the shared real sets.

Sets: Cambridge Street View and SF night test splits (``hafloc dataset prepare``, under --data;
absent ones are skipped) and, as transfer, the shared real data in their published layouts:
GardensPoint day vs night, an ie_tower_floors subset, landmarks_mini (Oxford protocol, mAP) and
VPR-Bench Corridor. "untrained" is what ``hafloc model init --method haf`` gives a user: the
ImageNet trunk with clusters fitted on the set's own database. Each model is scored with its own
protocol; intervals are paired bootstrap 95% intervals of the R@1 difference to the untrained
model over queries (10,000 resamples). Prints one table; --write records it in BENCHMARKS.md
(section "real-training") and writes the JSON beside --work.

    python benchmarks/real_training.py --model trained=runs/haf-streets/best.model --model default=default
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

from mdsection import update_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from hafloc.cli import main as cli  # noqa: E402
from hafloc.datasets.detect import load_dataset  # noqa: E402
from hafloc.descriptors.fit import fit_clusters  # noqa: E402
from hafloc.descriptors.modelfile import load_model, save_model  # noqa: E402
from hafloc.fileio import write_json_atomic  # noqa: E402
from hafloc.index.adapt import ADAPT_MIN_IMAGES, adapt_samples_per_image  # noqa: E402
from hafloc.metrics.evaluate import ExtractionSettings, evaluate  # noqa: E402
from hafloc.metrics.stats import hits_at, paired_bootstrap  # noqa: E402
from layouts import gardens_at, landmarks_oxford, tower_subset  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
STREETS = ("cambridge", "sfnight")
TRANSFER = ("gardens", "tower", "landmarks", "corridor")


def build_set(name: str, work: Path, data: Path, split: str) -> Path | None:
    """The folder of set ``name`` (built once under ``work`` from the shared data), None if absent."""
    if name in STREETS:
        root = data / name
        return root if (root / "images" / split).is_dir() else None
    root = work / "sets" / name
    if not root.exists():
        tmp = root.with_name(name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        if name == "gardens":
            gardens_at(SHARED, tmp)
        elif name == "tower":
            tower_subset(SHARED, tmp, floors=25, gallery_per_floor=12, queries_per_floor=4)
        elif name == "landmarks":
            landmarks_oxford(SHARED, tmp)
        elif name == "corridor":
            tmp.rmdir()
            return SHARED / "vprbench" / "datasets" / "corridor"
        tmp.rename(root)
    return root


def loaded_sets(sets, work: Path, data: Path):
    """(name, split, dataset) of each (name, split) of ``sets`` that exists (the others are named on stderr)."""
    for name, split in sets:
        root = build_set(name, work, data, split)
        if root is None:
            print(f"{name}: not found under {data} (run 'hafloc dataset prepare'), skipped", file=sys.stderr)
            continue
        yield name, split, load_dataset(root, split=split if name in STREETS else "test")


def set_args(description: str) -> argparse.Namespace:
    """--work, --data and --write: the arguments of the scripts that score the shipped model on these sets."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-real")
    ap.add_argument("--data", type=Path, default=REPO / "data")
    ap.add_argument("--write", action="store_true")
    return ap.parse_args()


def untrained_for(ds, path: Path) -> Path:
    """HAF as ``model init`` gives it: clusters fitted on (at most 300 of) the set's database images."""
    if not path.is_file():
        imgs = [str(p) for p in ds.db_paths()]
        assert cli(["model", "init", "--method", "haf", "--images", *imgs, "--output", str(path)]) == 0
    return path


def adapted_for(model_path: str, ds, path: Path) -> Path:
    """``model_path`` with its clusters re-fitted on the set's database (trained projections kept)."""
    if not path.is_file():
        model = load_model(model_path)
        dbp = ds.db_paths()
        pick = np.random.default_rng(0).permutation(len(dbp))[:300]
        spi = adapt_samples_per_image(len(pick), model)  # as `index build` samples
        fit_clusters(model, [dbp[i] for i in sorted(pick)], spi, projections=False, progress=False)
        save_model(model, path)
    return path


def run(
    models: dict[str, str], sets: list[str], work: Path, data: Path, split: str, adapt: list[str] | None = None
) -> list[dict]:
    rows = []
    settings = ExtractionSettings(backend="auto")
    for name in sets:
        root = build_set(name, work, data, split)
        if root is None:
            print(f"{name}: not found under {data} (run 'hafloc dataset prepare'), skipped", file=sys.stderr)
            continue
        ds = load_dataset(root, split=split if name in STREETS else "test")
        paths = {"untrained": str(untrained_for(ds, work / "models" / f"untrained-{name}-{split}.model")), **models}
        for label in adapt or []:
            paths[f"{label}+adapted"] = str(adapted_for(models[label], ds, work / "models" / f"{label}-{name}.model"))
        results = {}
        for label, path in paths.items():
            t0 = time.perf_counter()
            res = evaluate(load_model(path), ds, settings, cache_dir=work / "cache", progress=False)
            metric = "mAP" if "mAP" in res.metrics and "recall@1" not in res.metrics else "R@1"
            value = res.metrics["mAP"] if metric == "mAP" else res.metrics["recall@1"]
            results[label] = {
                "metric": metric,
                "value": float(value),
                "recall@5": res.metrics.get("recall@5"),
                "first_hits": res.query_first_hits().tolist() if metric == "R@1" else None,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        for label in adapt or []:  # what `hafloc index build` gives: adapted from ADAPT_MIN_IMAGES photos
            results[f"{label}, as built"] = dict(
                results[f"{label}+adapted"] if ds.num_db >= ADAPT_MIN_IMAGES else results[label]
            )
        base = results["untrained"]
        for label, r in results.items():
            if label != "untrained" and r["first_hits"] is not None:
                iv = paired_bootstrap(hits_at(r["first_hits"], 1), hits_at(base["first_hits"], 1))
                r["vs_untrained"] = iv.format(scale=100)
        rows.append(
            {
                "set": f"{name}-{split}" if name in STREETS else name,
                "queries": ds.num_q,
                "database": ds.num_db,
                "results": results,
            }
        )
        print(table([rows[-1]], list(paths)), flush=True)
        write_json_atomic(work / f"results-{split}.partial.json", {"models": models, "rows": rows})
    return rows


def table(rows: list[dict], labels: list[str]) -> str:
    head = "| set | queries / db | metric | " + " | ".join(labels) + " |"
    out = [head, "|" + "---|" * (3 + len(labels))]
    for row in rows:
        res = row["results"]
        cells = []
        for label in labels:
            r = res.get(label)
            if r is None:
                cells.append("")
                continue
            cell = f"{r['value']:.1f}"
            if "vs_untrained" in r:
                cell += f" ({r['vs_untrained']})"
            cells.append(cell)
        metric = next(iter(res.values()))["metric"]
        out.append(f"| {row['set']} | {row['queries']} / {row['database']} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def versus(rows: list[dict], a: str, b: str) -> str:
    """Paired 95% bootstrap interval of R@1(a) - R@1(b) per set (recall sets only)."""
    out = [f"| set | {a} R@1 | {b} R@1 | {a} - {b}, 95% interval |", "|---|---|---|---|"]
    for row in rows:
        ra, rb = row["results"].get(a), row["results"].get(b)
        if not ra or not rb or ra["first_hits"] is None:
            continue
        iv = paired_bootstrap(hits_at(ra["first_hits"], 1), hits_at(rb["first_hits"], 1))
        out.append(f"| {row['set']} | {ra['value']:.1f} | {rb['value']:.1f} | {iv.format(scale=100)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=FILE", help="a model to score (repeat)")
    ap.add_argument("--sets", nargs="+", default=[*STREETS, *TRANSFER])
    ap.add_argument("--split", default="test", help="split of the street sets (test; val for choices)")
    ap.add_argument("--data", type=Path, default=REPO / "data", help="where 'hafloc dataset prepare' wrote the sets")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-real")
    ap.add_argument(
        "--adapt",
        action="append",
        default=[],
        metavar="LABEL",
        help="also score LABEL with its clusters re-fitted on each set's database (repeat)",
    )
    ap.add_argument("--versus", action="append", default=[], metavar="A:B", help="paired R@1 intervals of A vs B")
    ap.add_argument("--write", action="store_true", help="record the table in BENCHMARKS.md")
    ap.add_argument("--section", default="real-training", help="BENCHMARKS.md section (split appended)")
    args = ap.parse_args()
    models = dict(m.split("=", 1) for m in args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = run(models, args.sets, args.work, args.data, args.split, args.adapt)
    labels = ["untrained", *models, *(f"{a}+adapted" for a in args.adapt), *(f"{a}, as built" for a in args.adapt)]
    text = table(rows, labels)
    for pair in args.versus:
        text += "\n\n" + versus(rows, *pair.split(":", 1))
    print(text)
    stem = "results" if args.section == "real-training" else f"{args.section}-results"
    write_json_atomic(args.work / f"{stem}-{args.split}.json", {"models": models, "rows": rows})
    if args.write:
        update_section(
            f"{args.section}-{args.split}",
            f"Models on real photos ({args.split} splits of the street sets; transfer sets whole). Cells: R@1 "
            "(mAP for landmarks) and, in brackets, the paired 95% bootstrap interval of the R@1 difference to "
            "the untrained HAF (clusters fitted on the set's own database). `+adapted`: the model's clusters "
            "re-fitted on the set's database (trained projections and attention kept); `as built`: what "
            f"`hafloc index build` gives, adapted from {ADAPT_MIN_IMAGES} database photos, as trained below. "
            "`python benchmarks/real_training.py "
            + " ".join(
                [
                    *("--model " + m for m in args.model),
                    *("--adapt " + a for a in args.adapt),
                    *("--versus " + v for v in args.versus),
                ]
            )
            + f" --split {args.split}`"
            f" on {platform.machine()}, {time.strftime('%Y-%m-%d')}.\n\n" + text + "\n",
        )


if __name__ == "__main__":
    main()

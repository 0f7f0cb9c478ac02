"""Recall cost of the index's compact representation (PCA-whitening to 4096/1024/256-D, float16).

The untrained default HAF model (EfficientNet-Lite0 ImageNet weights, paper settings, clusters
fitted on 30 database images; 24,576-D descriptors) describes each set once (cached in --out);
then every representation ``hafloc index build --dim N --dtype T`` can store is applied exactly as
the index applies it: ``hafloc.index.compact.Projection`` fitted on the first
``fit_sample_size`` database images (all of them here), database stored in T, queries projected
in float32. Sets: ie_tower_floors (504 queries vs the 2,373-image gallery, recall@N by label,
``hafloc.metrics.protocols.score``), and gardenspoint_mini (day vs night + the place triplets:
20 queries vs 30 images, same place = right); its database is too small to fit a projection, so
that one comes from the ie_tower gallery (a different domain: an upper bound on the cost). A
size needs more database images than dimensions: 4096-D is n/a on these sets.

    python benchmarks/compact.py                      # ~10 min the first time on 2 cores
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from hafloc.datasets.detect import load_dataset
from hafloc.descriptors.extract import Extractor
from hafloc.descriptors.fit import fit_clusters
from hafloc.descriptors.network import GeoLocNet, ModelConfig
from hafloc.index.compact import Projection, fit_sample_size
from hafloc.index.search import knn
from hafloc.metrics.protocols import score
from mdsection import update_section

REPO = Path(__file__).resolve().parents[1]
SIZES = ("full", 4096, 1024, 256)


def describe(model: GeoLocNet, paths: list[Path]) -> np.ndarray:
    res = Extractor(model, batch_size=16, backend="torch").extract_paths(paths, progress=True)
    if res.failures:
        raise SystemExit(f"unreadable images: {res.failures[:3]}")
    return res.descriptors


def gardens(data: Path) -> tuple[list[Path], list[str], list[Path], list[str]]:
    gp = data / "gardenspoint_mini"
    db, dbl, q, ql = [], [], [], []
    for p in sorted((gp / "vprtutorial_first10").rglob("*.jpg")):
        (db if p.parent.name == "ref" else q).append(p)
        (dbl if p.parent.name == "ref" else ql).append(f"v{p.stem}")
    for p in sorted((gp / "nicktrinh_triplets").rglob("*.jpg")):
        place, view = p.relative_to(gp / "nicktrinh_triplets").parts[:2]
        (q if view == "i0" else db).append(p)
        (ql if view == "i0" else dbl).append(place)
    return db, dbl, q, ql


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", type=Path, default=Path(os.environ.get("HAFLOC_SHARED_DATA", REPO.parent / "shared" / "data"))
    )
    ap.add_argument("--out", type=Path, default=Path("/tmp/hafloc-compact-bench"))
    ap.add_argument("--max-side", type=int, default=192)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tower = load_dataset(args.data / "ie_tower_floors", split="test")
    g_db, g_dbl, g_q, g_ql = gardens(args.data)
    cache = args.out / f"descriptors_{args.max_side}.npz"
    if cache.is_file():
        z = np.load(cache)
        t_db, t_q, gd, gq = z["t_db"], z["t_q"], z["g_db"], z["g_q"]
    else:
        torch.manual_seed(0)
        cfg = ModelConfig.for_method("haf")
        cfg.max_side = args.max_side
        model = GeoLocNet(cfg, pretrained=True)
        rng = np.random.default_rng(0)
        dbp = tower.db_paths()
        fit_clusters(model, [dbp[i] for i in sorted(rng.choice(len(dbp), 30, replace=False))], seed=0, progress=True)
        model.eval()
        t_db, t_q = describe(model, dbp), describe(model, tower.q_paths())
        gd, gq = describe(model, g_db), describe(model, g_q)
        np.savez(cache, t_db=t_db, t_q=t_q, g_db=gd, g_q=gq)
    print(f"descriptors {t_db.shape[1]}-D ready in {time.time() - t0:.0f} s", flush=True)

    rows = []
    for size in SIZES:
        proj = None
        if size != "full" and size < len(t_db):
            t = time.time()
            n_fit = min(len(t_db), fit_sample_size(t_db.shape[1], size))
            proj = Projection.fit(t_db[:n_fit], size)
            print(f"{size}-D projection fitted on {n_fit} images in {time.time() - t:.0f} s", flush=True)
        for dtype in ("float32", "float16"):
            if size != "full" and proj is None:
                rows.append({"size": size, "dtype": dtype, "na": True})
                continue
            db = proj(t_db) if proj else t_db
            q = proj(t_q) if proj else t_q
            db = db.astype(dtype).astype(np.float32)
            r = score(tower, db, q)
            gdb = (proj(gd) if proj else gd).astype(dtype).astype(np.float32)
            _, top = knn(gdb, proj(gq) if proj else gq, 1)
            g1 = 100.0 * np.mean([g_dbl[t[0]] == lab for t, lab in zip(top, g_ql)])
            dim = t_db.shape[1] if size == "full" else size
            rows.append(
                {
                    "size": size,
                    "dtype": dtype,
                    "dim": dim,
                    "bytes": dim * (2 if dtype == "float16" else 4),
                    "r1": r["recall@1"],
                    "r5": r["recall@5"],
                    "r10": r["recall@10"],
                    "g1": g1,
                }
            )
            print(rows[-1], flush=True)
    base = next(r for r in rows if r["size"] == "full" and r["dtype"] == "float32")
    head = (
        "| stored descriptor | bytes / image | ie_tower R@1 | R@5 | R@10 | R@1 change | gardenspoint_mini R@1 |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
    )
    body = ""
    for r in rows:
        name = (f"{r['dim']:,}-D (full)" if r["size"] == "full" else f"{r['size']:,}-D PCA-whitened") + f" {r['dtype']}"
        if r.get("na"):
            body += (
                f"| {r['size']:,}-D PCA-whitened {r['dtype']} | "
                f"{r['size'] * (2 if r['dtype'] == 'float16' else 4):,} | "
                f"n/a: needs more than {r['size']:,} database images | | | | |\n"
            )
            continue
        body += (
            f"| {name} | {r['bytes']:,} | {r['r1']:.2f} | {r['r5']:.2f} | {r['r10']:.2f} | "
            f"{r['r1'] - base['r1']:+.2f} | {r['g1']:.0f} |\n"
        )
    tab = head + body
    print(tab)
    section = (
        "## Compact index representation (recall cost)\n\n"
        f"`python benchmarks/compact.py` on {time.strftime('%Y-%m-%d')}: untrained default HAF model "
        "(EfficientNet-Lite0 "
        f"ImageNet weights, K=64, 3 x 128-D levels: {t_db.shape[1]:,}-D), longest side {args.max_side} px. Each row "
        "is what "
        "`hafloc index build --dim N --dtype T` stores: PCA-whitening fitted on the database (the first images "
        "added), database stored as T, queries projected the same way. ie_tower_floors: 504 queries vs the "
        "2,373-image gallery (recall@N by label). gardenspoint_mini: 20 queries (day vs night, and place triplets) "
        "vs 30 images; its projection is fitted on the ie_tower gallery (its own database is too small), and with "
        "20 queries one query is 5 points.\n\n" + tab
    )
    if not args.no_write:
        update_section("compact", section, args.output)
        print(f"updated {args.output}")


if __name__ == "__main__":
    main()

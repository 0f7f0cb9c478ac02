"""Verification signal: how well do verified inliers separate right from wrong retrieved candidates?

For every real set with known positions (../shared/data: GardensPoint/SFU triplets, GardensPoint
day vs night, an ie_tower_floors subset, Lund by EXIF GPS; the Cambridge and SF-night val splits
under ./data when ``hafloc dataset prepare`` wrote them), each query's global top-K candidates
(``--model``: the shipped default as ``index build`` gives it, or an untrained HAF with clusters
fitted on the set's database, as ``benchmarks/rerank.py``) are matched and verified by
each extractor + matcher. Printed per set: ROC AUC of the inlier count for right vs wrong pairs,
the median inliers of right / wrong pairs and the cost per pair (matching + MAGSAC; extraction per
image apart). The pairs (similarities, inliers, matches, spread, H/F, right) are kept as JSON under
``--work`` so ``benchmarks/fit_scorer.py`` fits and evaluates the learned re-ranking scorer on
them without verifying anything twice.

    python benchmarks/verification.py                         # the table, updates BENCHMARKS.md
    python benchmarks/verification.py --sets triplets --no-write
    python benchmarks/verification.py --records cambridge sfnight --k 10 --configs lg512
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from hafloc.cli import main as cli  # noqa: E402
from hafloc.datasets.geo import haversine_m  # noqa: E402
from hafloc.descriptors.extract import Extractor  # noqa: E402
from hafloc.descriptors.modelfile import load_model  # noqa: E402
from hafloc.images.gps import read_gps  # noqa: E402
from hafloc.index.rerank import Reranker  # noqa: E402
from layouts import even  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
EXTERNAL = REPO / "data"  # Cambridge / SF-night prepared splits (hafloc dataset prepare; optional)
LOCAL_CONF = {"max_side": 640, "max_keypoints": 1024}

# tag -> (extractor, extractor conf, matcher, matcher conf, label)
CONFIGS: dict[str, tuple[str, dict[str, Any], str, dict[str, Any], str]] = {
    "mnn": ("xfeat", LOCAL_CONF, "mnn", {"distance_threshold": 0.6}, "xfeat + MNN (cosine >= 0.82)"),
    "mnn_ratio": (
        "xfeat",
        LOCAL_CONF,
        "mnn",
        {"ratio_threshold": 0.9, "distance_threshold": 0.6},
        "xfeat + MNN (cosine >= 0.82, ratio 0.9)",
    ),
    "lg": ("xfeat", LOCAL_CONF, "lighterglue", {}, "xfeat + LighterGlue (1024 kp)"),
    "lg512": ("xfeat", LOCAL_CONF, "lighterglue", {"max_keypoints": 512}, "xfeat + LighterGlue (best 512 kp)"),
    "lg256": ("xfeat", LOCAL_CONF, "lighterglue", {"max_keypoints": 256}, "xfeat + LighterGlue (best 256 kp)"),
    "aliked": ("aliked", {"max_side": 640, "max_keypoints": 512}, "lightglue", {}, "ALIKED + LightGlue (512 kp)"),
}
SHARED_SETS = ("triplets", "gardens", "tower", "lund")
STREET_SETS = ("cambridge", "sfnight")  # their val splits: every query


@dataclass
class PairSet:
    """Queries against a database; ``right(i, j)``: database j is a right answer for query i;
    ``hidden(i, j)``: j is left out of query i's ranking (itself, the same capture month)."""

    name: str
    q: list[Path]
    db: list[Path]
    right: Callable[[int, int], bool]
    hidden: Callable[[int, int], bool] = lambda i, j: False


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _at_fields(p: Path) -> list[str]:
    return p.name.split("@")


def build_set(name: str, fit_queries: int = 10_000) -> PairSet:
    if name in ("triplets", "gardens"):
        root = SHARED / "gardenspoint_mini"
        if name == "triplets":  # view i0 of each place against views i1 + i2
            rows, col = _rows(root / "nicktrinh_triplets_labels.csv"), "place"
            is_query = [r["view"] == "i0" for r in rows]
        else:  # GardensPoint day (queries) against night
            rows, col = _rows(root / "vprtutorial_first10_labels.csv"), "place_index"
            is_query = [r["split"] == "query" for r in rows]
        q = [r for r, iq in zip(rows, is_query) if iq]
        db = [r for r, iq in zip(rows, is_query) if not iq]
        return PairSet(
            name, [root / r["image"] for r in q], [root / r["image"] for r in db], lambda i, j: q[i][col] == db[j][col]
        )
    if name == "tower":
        root = SHARED / "ie_tower_floors"
        rows = _rows(root / "dataset.csv")
        labels = sorted({r["label"] for r in rows})
        q, db = [], []
        for lab in even(labels, 8):
            db += even([r for r in rows if r["label"] == lab and r["split"] == "gallery"], 6)
            q += even([r for r in rows if r["label"] == lab and r["split"] == "query"], 3)
        return PairSet(
            name,
            [root / "images" / r["image"] for r in q],
            [root / "images" / r["image"] for r in db],
            lambda i, j: q[i]["label"] == db[j]["label"],
        )
    if name == "lund":
        paths = sorted((SHARED / "lund_gps" / "images").glob("*.jpg"))
        gps = [read_gps(p) for p in paths]
        d = np.array([[haversine_m(a[0], a[1], b[0], b[1]) for b in gps] for a in gps])  # type: ignore[index]
        return PairSet(name, paths, paths, lambda i, j: bool(d[i, j] <= 25.0), lambda i, j: i == j)
    if name in ("cambridge", "sfnight"):
        split = EXTERNAL / name / "images" / "val"
        qp = sorted((split / "queries").glob("*.jpg"))
        qp = even(qp, fit_queries)
        dbp = sorted((split / "database").glob("*.jpg"))
        qf, dbf = [_at_fields(p) for p in qp], [_at_fields(p) for p in dbp]
        qll = np.array([(float(f[5]), float(f[6])) for f in qf])
        dll = np.array([(float(f[5]), float(f[6])) for f in dbf])
        d = np.array([[haversine_m(a[0], a[1], b[0], b[1]) for b in dll] for a in qll])

        def hidden(i: int, j: int) -> bool:  # SF-night: the query's own capture month is left out
            return name == "sfnight" and qf[i][13] == dbf[j][13]

        return PairSet(name, qp, dbp, lambda i, j: bool(d[i, j] <= 25.0), hidden)
    raise ValueError(f"unknown set {name!r}")


def global_model(ps: PairSet, work: Path, which: str) -> Any:
    """The shipped default as ``hafloc index build`` gives it (adapted to the set's database), or an
    untrained HAF (clusters fitted on 40 database images, 480 px)."""
    if which == "default":
        from hafloc.index.adapt import adapt_model

        return adapt_model(load_model("default"), list(ps.db), work / f"{ps.name}-default")
    model_path = work / f"{ps.name}.model"
    if not model_path.is_file():
        imgs = [str(p) for p in even(ps.db, 40)]
        rc = cli(
            ["model", "init", "--method", "haf", "--images", *imgs, "--output", str(model_path), "--max-side", "480"]
        )
        assert rc == 0
    return load_model(model_path)


def global_ranking(ps: PairSet, work: Path, depth: int, model: str = "default") -> tuple[np.ndarray, np.ndarray]:
    """(Nq, depth) candidate database indices and their cosine similarities, best first."""
    cache = work / f"{ps.name}-global.npz"
    if cache.is_file():
        z = np.load(cache)
        if z["cands"].shape[1] >= min(depth, z["depth"]):
            return z["cands"][:, :depth], z["sims"][:, :depth]
    ex = Extractor(global_model(ps, work, model), backend="torch")
    qd = ex.extract_paths(list(ps.q), progress=False).descriptors
    dd = ex.extract_paths(list(ps.db), progress=False).descriptors
    sims = np.asarray(qd, np.float64) @ np.asarray(dd, np.float64).T
    for i in range(len(ps.q)):
        for j in range(len(ps.db)):
            if ps.hidden(i, j):
                sims[i, j] = -np.inf
    full = min(len(ps.db), 50)
    cands = np.argsort(-sims, axis=1, kind="stable")[:, :full]
    cs = np.take_along_axis(sims, cands, 1)
    np.savez(cache, cands=cands, sims=cs, depth=full)
    return cands[:, :depth], cs[:, :depth]


_RERANKERS: dict[str, Reranker] = {}
_FEATS: dict[tuple[str, str], Any] = {}
_EXTRACT_S: dict[str, list[float]] = {}


def _features(cfg: str, path: Path) -> Any:
    extractor, conf = CONFIGS[cfg][0], CONFIGS[cfg][1]
    fkey = f"{extractor}-{json.dumps(conf, sort_keys=True)}"
    if (fkey, str(path)) not in _FEATS:
        from hafloc.images.io import load_image

        img = load_image(path)
        t0 = time.perf_counter()
        _FEATS[(fkey, str(path))] = _RERANKERS[cfg].features(img)
        _EXTRACT_S.setdefault(fkey, []).append(time.perf_counter() - t0)
    return _FEATS[(fkey, str(path))]


def records(ps: PairSet, cfg: str, k: int, work: Path, model: str = "default") -> dict[str, Any]:
    """Every query's top-``k`` candidates verified by ``cfg`` (cached as JSON under ``work``)."""
    out_path = work / "records" / f"{ps.name}-{cfg}-k{k}.json"
    for done in sorted(out_path.parent.glob(f"{ps.name}-{cfg}-k*.json")):
        if int(done.stem.rsplit("-k", 1)[1]) >= k:  # a deeper record holds these pairs too
            return json.loads(done.read_text())
    cands, sims = global_ranking(ps, work, k, model)
    if cfg not in _RERANKERS:
        extractor, conf, matcher, mconf, _ = CONFIGS[cfg]
        _RERANKERS[cfg] = Reranker(extractor, conf, matcher, mconf)
    rr = _RERANKERS[cfg]
    queries, seconds, pairs = [], 0.0, 0
    for i in range(len(ps.q)):
        ok = np.isfinite(sims[i])
        cs, ss = cands[i][ok], sims[i][ok]
        qf = _features(cfg, ps.q[i])
        dbf = [_features(cfg, ps.db[j]) for j in cs]
        t0 = time.perf_counter()
        ver = rr.verify(qf, dbf)
        seconds += time.perf_counter() - t0
        pairs += len(cs)
        queries.append(
            {
                "query": str(ps.q[i]),
                "cands": [int(j) for j in cs],
                "sims": [float(s) for s in ss],
                "right": [ps.right(i, int(j)) for j in cs],
                "inliers": [v.inliers for v in ver],
                "matches": [v.matches for v in ver],
                "spread": [round(v.spread, 4) for v in ver],
                "homography": [v.model == "H" for v in ver],
            }
        )
    fkey = f"{CONFIGS[cfg][0]}-{json.dumps(CONFIGS[cfg][1], sort_keys=True)}"
    ext = _EXTRACT_S.get(fkey, [])
    doc = {
        "set": ps.name,
        "config": cfg,
        "k": k,
        "queries": queries,
        "seconds_per_pair": seconds / max(pairs, 1),
        "extract_seconds_per_image": float(np.mean(ext)) if ext else None,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc))
    return doc


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a right pair scores above a wrong one), ties counting half (Mann-Whitney)."""
    if not len(pos) or not len(neg):
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="stable")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def work_dir(work: str | None, model: str) -> Path:
    """Where the pairs of one global model are kept (records differ by model: its candidates)."""
    return Path(work) if work else Path(tempfile.gettempdir()) / f"hafloc-bench-verification-{model}"


def signal_row(doc: dict[str, Any], k: int = 10) -> dict[str, Any]:
    inl = np.array([v for q in doc["queries"] for v in q["inliers"][:k]], np.float64)
    right = np.array([v for q in doc["queries"] for v in q["right"][:k]], bool)
    return {
        "auc": roc_auc(inl[right], inl[~right]),
        "right": int(right.sum()),
        "wrong": int((~right).sum()),
        "median_right": float(np.median(inl[right])) if right.any() else float("nan"),
        "median_wrong": float(np.median(inl[~right])) if (~right).any() else float("nan"),
        "p90_wrong": float(np.percentile(inl[~right], 90)) if (~right).any() else float("nan"),
        "s_pair": doc["seconds_per_pair"],
        "s_extract": doc["extract_seconds_per_image"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="*", default=[*SHARED_SETS, *(n for n in STREET_SETS if (EXTERNAL / n).is_dir())])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--aliked-sets", nargs="+", default=["triplets", "gardens"], help="ALIKED is slow: these sets only")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--records", nargs="*", default=[], help="also record these sets (e.g. cambridge sfnight)")
    ap.add_argument("--deep", nargs="*", default=[], help="configs recorded at K = 50 on the sets (re-ranking tests)")
    ap.add_argument("--fit-queries", type=int, default=10_000, help="at most this many val queries per street set")
    ap.add_argument(
        "--model", choices=("default", "untrained"), default="default", help="the global model ranking candidates"
    )
    ap.add_argument("--work", default=None, help="pairs kept here (default: a temp folder per --model)")
    ap.add_argument("--only-recorded", action="store_true", help="table only the pairs already recorded under --work")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    work = work_dir(args.work, args.model)
    work.mkdir(parents=True, exist_ok=True)
    for name in args.records:
        if (EXTERNAL / name).is_dir() or name in SHARED_SETS:
            ps = build_set(name, args.fit_queries)
            for cfg in args.configs:
                t0 = time.perf_counter()
                records(ps, cfg, args.k, work, args.model)
                print(f"recorded {name} {cfg} k={args.k} in {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.sets:
        return
    rows = []
    for name in args.sets:
        ps = build_set(name)
        for cfg in args.deep:
            records(ps, cfg, 50, work, args.model)
        for cfg in args.configs:
            if cfg == "aliked" and name not in args.aliked_sets:
                continue
            if name in STREET_SETS and not cfg.startswith("mnn"):  # LighterGlue on their ~2,700 pairs: an hour
                continue
            if args.only_recorded and not list((work / "records").glob(f"{name}-{cfg}-k*.json")):
                continue
            t0 = time.perf_counter()
            r = signal_row(records(ps, cfg, args.k, work, args.model), args.k)
            rows.append((name, cfg, len(ps.q), len(ps.db), r))
            print(
                name,
                cfg,
                {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()},
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    lines = [
        "| set | queries / db | extractor + matcher | ROC AUC | right / wrong pairs | median inliers right / wrong "
        "| wrong 90th pct | s per pair | extract s/img | top-10 s/query |",
        "|" + "---|" * 10,
    ]
    for name, cfg, nq, ndb, r in rows:
        ext = f"{r['s_extract']:.3f}" if r["s_extract"] is not None else "-"
        per_query = f"{(r['s_extract'] or 0.0) + 10 * r['s_pair']:.2f}"
        lines.append(
            f"| {name} | {nq} / {ndb} | {CONFIGS[cfg][4]} | {r['auc']:.3f} | {r['right']} / {r['wrong']} | "
            f"{r['median_right']:.0f} / {r['median_wrong']:.0f} | {r['p90_wrong']:.0f} | {r['s_pair']:.3f} | {ext} "
            f"| {per_query} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        from mdsection import update_section

        update_section(
            "verification",
            "## Verification signal (`benchmarks/verification.py`)\n\n"
            f"Machine: {platform.machine()}, 2 CPU cores shared with other jobs while measured (times are "
            f"upper bounds). Pairs: each query against its global top {args.k} ("
            + (
                "the shipped default model as `hafloc index build` gives it, adapted to the set's database"
                if args.model == "default"
                else "untrained HAF, clusters fitted on the set's database, 480 px"
            )
            + "); right = same place (triplets, GardensPoint day/night, tower floor), within 25 m by EXIF GPS "
            "(Lund, every photo against the 28 others) or within 25 m (Cambridge and SF-night val splits, every "
            "query; SF night: other capture months only). ROC AUC: P(a right pair has more "
            "verified inliers than a wrong one), ties half. Local features at 640 px; MAGSAC (F, H fallback) "
            "with 2,000 iterations; s per pair = matching + verification; top-10 s/query = query features + 10 "
            "pairs (the database's features come from the index). torch/OpenMP threads as in the environment "
            "(OMP_NUM_THREADS=1 when measured).\n\n" + table + "\n",
        )


if __name__ == "__main__":
    main()

"""Re-ranking benchmark: global retrieval vs re-ranking by verified local matches, on real photos.

Datasets: the test splits of the street sets (``hafloc dataset prepare``: Cambridge, SF night,
skipped when absent) and, built from ../shared/data in their published layouts as the tests build
them, the GardensPoint/SFU triplets (view i0 of each place against i1 + i2) and GardensPoint day vs
night ('@' folders), an ie_tower_floors subset (label CSV), landmarks_mini in Oxford5k's layout
(mAP) and the synthetic demo city's test split. Model (``--model``): the shipped default as
``hafloc index build`` gives it (adapted to the set's database from ``ADAPT_MIN_IMAGES`` photos),
or an untrained HAF (clusters fitted on each database). Re-ranking uses the extractor's default
rule (for xfeat the shipped learned scorer; nothing fitted on these test queries). Prints one table
and updates the "Re-ranking" section of BENCHMARKS.md.

    python benchmarks/rerank.py                      # xfeat on every set, disk on GardensPoint
    python benchmarks/rerank.py --sets gardens --no-write
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from mdsection import update_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from hafloc.cli import main as cli  # noqa: E402
from hafloc.datasets.detect import load_dataset  # noqa: E402
from hafloc.descriptors.modelfile import load_model  # noqa: E402
from hafloc.index.adapt import ADAPT_MIN_IMAGES  # noqa: E402
from hafloc.index.rerank import Reranker  # noqa: E402
from hafloc.local import write_local_features  # noqa: E402
from hafloc.metrics.evaluate import ExtractionSettings, extract_dataset, headline, score_descriptors  # noqa: E402
from hafloc.metrics.verified import RankReranker, RerankSettings  # noqa: E402
from layouts import gardens_at, landmarks_oxford, tower_subset, triplets_at  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
KS = (10, 50, 5, 20)  # 10 first: its timing is the table's; the others reuse verified pairs


STREETS = ("cambridge", "sfnight")


def build_sets(work: Path, names: list[str], data: Path) -> dict[str, Path]:
    out = {}
    for name in names:
        if name in STREETS:
            if (data / name / "images" / "test").is_dir():
                out[name] = data / name
            else:
                print(f"{name}: not found under {data} (run 'hafloc dataset prepare'), skipped", file=sys.stderr)
            continue
        root = work / name
        if not root.exists():
            tmp = Path(tempfile.mkdtemp(dir=work))
            if name == "gardens":
                gardens_at(SHARED, tmp)
            elif name == "triplets":
                triplets_at(SHARED, tmp)
            elif name == "tower":
                tower_subset(SHARED, tmp, floors=25, gallery_per_floor=12, queries_per_floor=3)
            elif name == "landmarks":
                landmarks_oxford(SHARED, tmp)
            elif name == "synthetic":
                from hafloc.synth import SyntheticCityConfig, generate_city

                generate_city(tmp, SyntheticCityConfig.quick(seed=0), progress=False)
            tmp.rename(root)
        out[name] = root
    return out


def model_for(ds, path: Path, which: str = "untrained") -> str | Path:
    """An untrained HAF fitted on (40 of) the set's database, or the default as ``index build`` gives it."""
    if which == "default":
        if ds.num_db < ADAPT_MIN_IMAGES:
            return "default"
        from real_training import adapted_for

        return adapted_for("default", ds, path)
    if not path.is_file():
        imgs = [str(p) for p in ds.db_paths()[:: max(1, ds.num_db // 40)][:40]]
        rc = cli(["model", "init", "--method", "haf", "--images", *imgs, "--output", str(path), "--max-side", "480"])
        assert rc == 0
    return path


def primary(result: dict, prefix: str = "") -> tuple[float, float | None]:
    if f"{prefix}recall@1" in result:
        return result[f"{prefix}recall@1"], result[f"{prefix}recall@5"]
    key = next(k for k in headline(result) if k.startswith("mAP"))
    return result[prefix + key], None


def run_set(name: str, root: Path, work: Path, extractor: str, which: str = "untrained") -> dict:
    ds = load_dataset(root, split="test")
    model = load_model(model_for(ds, work / f"{name}-{which}.model", which))
    settings = ExtractionSettings(backend="torch")
    d = extract_dataset(model, ds, settings, cache_dir=work / "cache", progress=False)
    ex = settings.extractor_for(model, ds)
    rr_settings = RerankSettings(k=KS[0], extractor=extractor, conf={"max_keypoints": 1024, "max_side": 640})
    reranker = Reranker(extractor, rr_settings.conf)
    holder: dict[str, RankReranker] = {}

    def factory(ds_ok, db, q):
        if "rr" not in holder:
            from hafloc.metrics.evaluate import image_key

            holder["rr"] = RankReranker(
                rr_settings,
                reranker,
                ds_ok.db_paths(),
                ds_ok.q_paths(),
                db,
                q,
                load=ex.load,
                key=image_key,
                cache=None,
                progress=False,
            )
        return holder["rr"]

    by_k = {}
    timing = None
    for k in KS:
        if "rr" in holder:
            holder["rr"].k = k
        rr_settings.k = k
        res = score_descriptors(ds, d, rerank=factory)
        by_k[k] = res
        if timing is None:
            timing = {**res["rerank"]["seconds_per_query"], **res["rerank"]["query_seconds"]}
    rr = holder["rr"]
    feats = [rr._db_memo[j] for j in rr._db_memo]
    h5 = work / f"{name}-{extractor}-features.h5"
    write_local_features(h5, {str(i): f for i, f in enumerate(feats)}, append=False)
    kb = h5.stat().st_size / max(len(feats), 1) / 1024
    g1, g5 = primary(by_k[10], "global_")
    return {
        "name": name,
        "ds": ds,
        "extractor": extractor,
        "global": (g1, g5),
        "rerank": {k: primary(r) for k, r in by_k.items()},
        "timing": timing,
        "kb": kb,
        "queries": ds.num_q,
        "db": ds.num_db,
    }


def fmt(v: tuple[float, float | None]) -> str:
    return f"{v[0]:.1f} / {v[1]:.1f}" if v[1] is not None else f"{v[0]:.1f} (mAP)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=[*STREETS, "triplets", "gardens", "tower", "landmarks", "synthetic"])
    ap.add_argument("--model", choices=("default", "untrained"), default="default", help="global model (see above)")
    ap.add_argument("--data", type=Path, default=REPO / "data", help="where 'hafloc dataset prepare' wrote the sets")
    ap.add_argument("--second", default="disk", help="second extractor, run on GardensPoint (default disk)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "hafloc-bench-rerank"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sets = build_sets(work, args.sets, args.data)
    rows = []
    t0 = time.perf_counter()
    for name, root in sets.items():
        rows.append(run_set(name, root, work, "xfeat", args.model))
        print(rows[-1]["name"], rows[-1]["global"], rows[-1]["rerank"], flush=True)
    if args.second and "gardens" in sets:
        rows.append(run_set("gardens", sets["gardens"], work, args.second, args.model))
    head = (
        "| dataset | queries / db | local | global R@1 / R@5 | re-ranked R@1 / R@5 (top 10) | re-ranked R@1 at "
        "K = 5 / 20 / 50 | query features s | matching s/query (top 10) | s/query median / p95 | KB per db image |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        t = r["timing"]
        ks = " / ".join(f"{r['rerank'][k][0]:.1f}" for k in (5, 20, 50))
        lines.append(
            f"| {r['name']} | {r['queries']} / {r['db']} | {r['extractor']} | {fmt(r['global'])} | "
            f"{fmt(r['rerank'][10])} | {ks} | {t['query_features']:.3f} | {t['matching']:.3f} | "
            f"{t['median']:.3f} / {t['p95']:.3f} | {r['kb']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if not args.no_write:
        update_section(
            "rerank",
            "## Re-ranking by verified local matches (`benchmarks/rerank.py`)\n\n"
            f"Machine: {platform.processor() or platform.machine()}, torch threads = all cores. Global: "
            + (
                f"the shipped default model as `hafloc index build` gives it (adapted from {ADAPT_MIN_IMAGES} database "
                "photos)"
                if args.model == "default"
                else "an untrained HAF (480 px, clusters fitted on 40 database images)"
            )
            + "; then the extractor's default rule (xfeat: the shipped learned scorer) over xfeat (1024 "
            "keypoints, 640 px) matched by mutual nearest neighbours at cosine >= 0.82 (disk: LightGlue) "
            "with MAGSAC verification; street sets: their test splits; "
            "landmarks row = mAP (Oxford protocol, full queries). "
            "Query features and matching are mean seconds per query, and the median / 95th percentile of "
            "their sum over the queries; database features are computed once "
            "per image (at index build time in `hafloc index build --local`). Seconds measured while other jobs "
            "shared the 2 cores: read them as upper bounds.\n\n" + table + "\n",
        )


if __name__ == "__main__":
    main()

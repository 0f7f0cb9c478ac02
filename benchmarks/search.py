"""Search benchmark: exact (flat) vs IVF-PQ (+ exact re-ranking) on clustered synthetic descriptors.

Database: N unit vectors of dim D around 2,000 Gaussian cluster centres; queries: database vectors
plus noise, re-normalised. Measures build time, single-query latency (one faiss thread, as a
server answering one request would run), batched throughput (batches of 1000) and
top-1 agreement with exact search. Prints a table and updates the "Search" section of
BENCHMARKS.md at the repo root (other sections are kept).

    python benchmarks/search.py                  # 100k and 1M x 256-D
    python benchmarks/search.py --sizes 100000 --no-write
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import faiss
import numpy as np

from hafloc.index.search import SearchConfig, build_search_index, search
from mdsection import update_section

REPO = Path(__file__).resolve().parents[1]


def clustered_descriptors(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors around random unit centres, generated in blocks to bound memory."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        x = centres[rng.integers(0, clusters, e - s)]
        x += (spread / np.sqrt(dim)) * rng.standard_normal((e - s, dim), dtype=np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def make_queries(db: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = db[rng.choice(len(db), n, replace=False)].copy()
    q += (noise / np.sqrt(db.shape[1])) * rng.standard_normal(q.shape, dtype=np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def single_latencies(index, queries: np.ndarray, k: int) -> np.ndarray:
    """Per-query wall time (ms), one faiss thread: what one request costs a server."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        search(index, queries[:5], k)  # warm caches
        times = []
        for q in queries:
            t = time.perf_counter()
            search(index, q[None], k)
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        faiss.omp_set_num_threads(threads)
    return np.asarray(times)


def batch_qps(index, queries: np.ndarray, k: int, batch: int = 1000) -> float:
    t = time.perf_counter()
    for s in range(0, len(queries), batch):
        search(index, queries[s : s + batch], k)
    return len(queries) / (time.perf_counter() - t)


def run_size(n: int, dim: int, nq: int, k: int, n_single_flat: int, seed: int, noise: float) -> list[dict]:
    t = time.perf_counter()
    db = clustered_descriptors(n, dim, clusters=2000, spread=1.0, seed=seed)
    queries = make_queries(db, nq, noise=noise, seed=seed + 1)
    print(f"[{n:,}] generated in {time.perf_counter() - t:.1f}s", flush=True)
    rows = []

    t = time.perf_counter()
    flat = build_search_index(db, SearchConfig(kind="flat"))
    build_s = time.perf_counter() - t
    qps = batch_qps(flat, queries, k)
    exact_ids = search(flat, queries, k)[1]
    lat = single_latencies(flat, queries[:n_single_flat], k)
    rows.append(
        dict(
            n=n,
            kind="flat (exact)",
            params="IndexFlatIP",
            build_s=build_s,
            p50=np.percentile(lat, 50),
            p95=np.percentile(lat, 95),
            qps=qps,
            agree=1.0,
            n_single=len(lat),
        )
    )
    print(f"[{n:,}] flat done", flush=True)
    del flat

    t = time.perf_counter()
    ivf = build_search_index(db, SearchConfig(kind="ivfpq"))
    build_s = time.perf_counter() - t
    print(f"[{n:,}] IVF-PQ built in {build_s:.1f}s", flush=True)
    qps = batch_qps(ivf, queries, k)
    ids = search(ivf, queries, k)[1]
    lat = single_latencies(ivf, queries, k)
    p = ivf.params
    rows.append(
        dict(
            n=n,
            kind="IVF-PQ + exact re-rank",
            build_s=build_s,
            p50=np.percentile(lat, 50),
            p95=np.percentile(lat, 95),
            qps=qps,
            agree=float((ids[:, 0] == exact_ids[:, 0]).mean()),
            params=f"IVF{p['nlist']},PQ{p['m']}x{p['nbits']},nprobe={p['nprobe']},refine={p['refine_factor']}k",
            n_single=len(lat),
        )
    )
    return rows


def table(rows: list[dict], dim: int, k: int) -> str:
    head = (
        "| database | index | parameters | build (s) | single query p50 (ms) | p95 (ms) | "
        "batch queries/s | top-1 = exact |\n|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['n']:,} x {dim} | {r['kind']} | {r['params']} | {r['build_s']:.1f} | {r['p50']:.2f} | "
        f"{r['p95']:.2f} | {r['qps']:,.0f} | {r['agree']:.3f} |\n"
        for r in rows
    )
    return head + body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--flat-single", type=int, default=100, help="single queries timed for flat (slow at 1M)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.5, help="query noise, relative to the cluster spread (1.0)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="faiss threads for building and batches (default 1: on a shared machine OpenMP "
        "spin-waiting makes 2 threads slower than 1)",
    )
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = ap.parse_args()

    faiss.omp_set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        rows += run_size(n, args.dim, args.queries, args.k, args.flat_single, args.seed, args.noise)
    tab = table(rows, args.dim, args.k)
    print(tab)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    section = (
        "## Search (flat vs IVF-PQ)\n\n"
        f"`python benchmarks/search.py` on {time.strftime('%Y-%m-%d')}: {platform.processor() or platform.machine()}, "
        f"{cpus} CPU cores (shared with other jobs while measured, so times are upper bounds), "
        f"faiss {faiss.__version__}.\n"
        f"Database: {args.dim}-D unit vectors around 2,000 Gaussian cluster centres; {args.queries} queries = "
        f"database vectors + noise ({args.noise} x the cluster spread, re-normalised); k = {args.k}. "
        "Single-query latency with one faiss thread; "
        f"build and batch throughput with {args.threads} faiss thread(s), batches of 1000; top-1 agreement against "
        "exact search. "
        "IVF-PQ is trained on the database (64 vectors per cell) and re-ranks a shortlist of "
        "refine x k PQ candidates with exact distances.\n\n" + tab
    )
    if not args.no_write:
        update_section("search", section, args.output)
        print(f"updated {args.output}")


if __name__ == "__main__":
    main()

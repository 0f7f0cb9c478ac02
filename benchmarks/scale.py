"""Scale benchmark: search past RAM (on-disk IVF-PQ + exact re-ranking from float16 chunk files).

Database: N synthetic 256-D unit vectors around 10,000 Gaussian cluster centres, generated in
chunks of 1M with a fixed seed and written as float16 ``.npy`` chunk files, exactly the files an
index stores (never more than one chunk in memory: 10M x 256 float32 would be 10 GB). Queries:
1,000 database vectors plus noise, re-normalised. The on-disk search is built by the code
``hafloc index build`` uses (``hafloc.index.ondisk.build_ondisk``) in a subprocess; serving runs
in a fresh subprocess that opens the index memory-mapped and answers the queries one at a time
(one faiss thread), and reports its peak RSS (VmHWM: everything it touched, mapped pages
included). Ground truth: a chunked brute-force scan of the same float16 vectors.

    python benchmarks/scale.py --sizes 1e5            # smoke run, ~1 min
    python benchmarks/scale.py --sizes 1e6,1e7        # the BENCHMARKS.md table (10M: ~1 h on 2 cores)
    python benchmarks/scale.py --sizes 1e6,1e7 --reuse   # table again, rerunning only sizes not in WORK/rows.jsonl

The Ray extraction rows (single process vs Ray actors) come from ``benchmarks/scale_ray.py``'s
``measure()``; ``--no-ray`` skips them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

CHUNK = 1_000_000  # rows per generated chunk file
CLUSTERS = 10_000


def chunk_file(work: Path, j: int) -> Path:
    return work / "chunks" / f"chunk_{j:06d}.npy"


def generate(work: Path, n: int, dim: int, seed: int) -> int:
    """Write the database as float16 chunk files (resumes: complete chunks are kept)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    (work / "chunks").mkdir(parents=True, exist_ok=True)
    count = 0
    for j, start in enumerate(range(0, n, CHUNK)):
        rows = min(CHUNK, n - start)
        p = chunk_file(work, j)
        count += 1
        if p.is_file():
            continue
        r = np.random.default_rng([seed, j])
        out = np.empty((rows, dim), np.float16)
        for s in range(0, rows, 100_000):
            e = min(rows, s + 100_000)
            x = centres[r.integers(0, CLUSTERS, e - s)]
            x += (1.0 / np.sqrt(dim)) * r.standard_normal((e - s, dim), dtype=np.float32)
            out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
        tmp = p.with_suffix(".partial.npy")
        np.save(tmp, out)
        os.replace(tmp, p)
    return count


def locator(n: int) -> np.ndarray:
    i = np.arange(n, dtype=np.int64)
    return np.stack([i // CHUNK, i % CHUNK], axis=1).astype(np.int32)


def queries(work: Path, n: int, nq: int, dim: int, seed: int, noise: float) -> np.ndarray:
    from hafloc.index.ondisk import ChunkVectors

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng([seed, 999])
    rows = np.sort(rng.choice(n, nq, replace=False))
    q = ChunkVectors(locator(n), lambda c: chunk_file(work, c))(rows)
    q += (noise / np.sqrt(dim)) * rng.standard_normal(q.shape, dtype=np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_top1(work: Path, n: int, q: np.ndarray) -> np.ndarray:
    """Brute-force top-1 over the float16 chunks, 100k rows at a time."""
    best = np.full(len(q), -np.inf, np.float32)
    arg = np.full(len(q), -1, np.int64)
    for j, start in enumerate(range(0, n, CHUNK)):
        a = np.load(chunk_file(work, j), mmap_mode="r")
        for s in range(0, len(a), 100_000):
            flat = faiss.IndexFlatIP(q.shape[1])
            flat.add(np.ascontiguousarray(a[s : s + 100_000], dtype=np.float32))
            d, i = flat.search(q, 1)
            better = d[:, 0] > best
            best[better], arg[better] = d[better, 0], start + s + i[better, 0]
    return arg


def peak_rss_mb(field: str = "VmHWM") -> float:
    """VmHWM: peak resident set (mapped file pages included); RssAnon: resident anonymous memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- subprocess roles: build, serve (each reports its own peak RSS) ---------------------------


def role_build(work: Path, n: int, dim: int, threads: int) -> dict:
    from hafloc.fileio import write_json_atomic
    from hafloc.index.ondisk import ChunkVectors, build_ondisk
    from hafloc.index.search import SearchConfig, params_path, resolve_params

    faiss.omp_set_num_threads(threads)
    params = resolve_params(n, dim, SearchConfig(kind="ondisk"))
    loc = locator(n)
    np.save(work / "search.rows.npy", loc)
    t = time.perf_counter()
    index = build_ondisk(work / "search.faiss", ChunkVectors(loc, lambda c: chunk_file(work, c)), params, progress=True)
    build_s = time.perf_counter() - t
    write_json_atomic(params_path(work / "search.faiss"), index.params)
    return {"build_s": build_s, "build_peak_mb": peak_rss_mb(), "params": index.params}


def role_serve(work: Path, k: int) -> dict:
    from hafloc.index.ondisk import ChunkVectors
    from hafloc.index.search import load_search_index, search

    faiss.omp_set_num_threads(1)  # one request, one thread: what a server worker spends
    t = time.perf_counter()
    index = load_search_index(work / "search.faiss")
    index.vectors = ChunkVectors(np.load(work / "search.rows.npy", mmap_mode="r"), lambda c: chunk_file(work, c))
    load_s = time.perf_counter() - t
    q = np.load(work / "queries.npy")
    loaded_mb = peak_rss_mb()
    search(index, q[:5], k)
    times, top1 = [], []
    for x in q:
        t = time.perf_counter()
        _, ids = search(index, x[None], k)
        times.append((time.perf_counter() - t) * 1e3)
        top1.append(int(ids[0, 0]))
    return {
        "load_s": load_s,
        "loaded_mb": loaded_mb,
        "serve_peak_mb": peak_rss_mb(),
        "anon_mb": peak_rss_mb("RssAnon"),
        "p50": float(np.percentile(times, 50)),
        "p95": float(np.percentile(times, 95)),
        "top1": top1,
    }


def subprocess_role(role: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--role", role, *args], stdout=subprocess.PIPE, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def dir_bytes(*paths: Path) -> int:
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def run_size(root: Path, n: int, dim: int, nq: int, k: int, seed: int, noise: float, keep: bool, threads: int) -> dict:
    from hafloc.index.ondisk import disk_usage

    work = root / f"n{n}"
    t = time.perf_counter()
    generate(work, n, dim, seed)
    print(f"[{n:,}] database written in {time.perf_counter() - t:.0f}s", flush=True)
    q = queries(work, n, nq, dim, seed, noise)
    np.save(work / "queries.npy", q)
    t = time.perf_counter()
    truth = exact_top1(work, n, q)
    print(f"[{n:,}] exact ground truth in {time.perf_counter() - t:.0f}s", flush=True)
    built = subprocess_role("build", str(work), str(n), str(dim), str(threads))
    print(f"[{n:,}] built in {built['build_s']:.0f}s", flush=True)
    served = subprocess_role("serve", str(work), str(k))
    p = built["params"]
    row = {
        "n": n,
        "dim": dim,
        "build_s": built["build_s"],
        "build_peak_mb": built["build_peak_mb"],
        "search_disk_gb": disk_usage(work / "search.faiss") / 1e9,
        "vectors_disk_gb": dir_bytes(work / "chunks") / 1e9,
        "serve_peak_mb": served["serve_peak_mb"],
        "anon_mb": served["anon_mb"],
        "loaded_mb": served["loaded_mb"],
        "load_s": served["load_s"],
        "p50": served["p50"],
        "p95": served["p95"],
        "agree": float(np.mean(np.asarray(served["top1"]) == truth)),
        "params": f"IVF{p['nlist']},PQ{p['m']}x{p['nbits']}, nprobe {p['nprobe']}, re-rank {p['refine_factor']}k",
    }
    print(json.dumps(row), flush=True)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


# -- Ray extraction rows ----------------------------------------------------------------------


def ray_rows() -> list[dict] | None:
    """Single process vs Ray actors on real photos: ``benchmarks/scale_ray.py``'s ``measure()``."""
    import scale_ray  # type: ignore[import-not-found]

    return scale_ray.measure()


def ray_table(rows: list[dict]) -> str:
    import scale_ray  # type: ignore[import-not-found]

    return scale_ray.table(rows) + "\n"


def table(rows: list[dict], k: int) -> str:
    head = (
        "| database | parameters | build (s) | build peak RAM (MB) | search files (GB) | float16 vectors (GB) | "
        "serving peak RSS (MB) | of which anonymous (MB) | single query p50 (ms) | p95 (ms) | top-1 = exact |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['n']:,} x {r['dim']} | {r['params']} | {r['build_s']:.0f} | {r['build_peak_mb']:.0f} | "
        f"{r['search_disk_gb']:.2f} | {r['vectors_disk_gb']:.2f} | {r['serve_peak_mb']:.0f} | {r['anon_mb']:.0f} | "
        f"{r['p50']:.2f} | "
        f"{r['p95']:.2f} | {r['agree']:.3f} |\n"
        for r in rows
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e6,1e7", help="database sizes, comma separated (e.g. 1e5 for a smoke run)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.5, help="query noise, relative to the cluster spread (1.0)")
    ap.add_argument(
        "--work",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "hafloc-scale",
        help="scratch folder for the generated database and index (deleted afterwards)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="faiss threads for building (default 1: on a shared machine OpenMP spin-waiting makes "
        "2 threads slower than 1)",
    )
    ap.add_argument("--note", default="", help="a sentence appended to the BENCHMARKS.md section")
    ap.add_argument("--reuse", action="store_true", help="take sizes already measured from WORK/rows.jsonl")
    ap.add_argument("--keep", action="store_true", help="keep the scratch files")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray extraction rows")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "build":
        work, n, dim, threads = args.role_args
        print(json.dumps(role_build(Path(work), int(n), int(dim), int(threads))))
        return
    if args.role == "serve":
        work, k = args.role_args
        print(json.dumps(role_serve(Path(work), int(k))))
        return

    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    log = args.work / "rows.jsonl"  # every finished size, appended: --reuse takes the latest one per size
    done = {}
    if args.reuse and log.is_file():
        done = {r["n"]: r for r in map(json.loads, log.read_text().splitlines())}
    rows = []
    for n in sizes:
        if n in done:
            rows.append(done[n])
            continue
        rows.append(
            run_size(args.work, n, args.dim, args.queries, args.k, args.seed, args.noise, args.keep, args.threads)
        )
        with open(log, "a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
    tab = table(rows, args.k)
    print(tab)
    ray = None if args.no_ray else ray_rows()
    if ray:
        print(ray_table(ray))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    section = (
        "## Scale (search past RAM)\n\n"
        f"`python benchmarks/scale.py --sizes {args.sizes}` on {time.strftime('%Y-%m-%d')}: "
        f"{platform.processor() or platform.machine()}, {cpus} CPU cores (shared with other jobs while measured, "
        f"so times are upper bounds), faiss {faiss.__version__}.\n"
        f"Database: {args.dim}-D unit vectors around {CLUSTERS:,} Gaussian cluster centres, stored as float16 chunk "
        f"files of {CHUNK:,} rows; {args.queries} queries = database vectors + noise ({args.noise} x the cluster "
        f"spread); k = {args.k}. On-disk IVF-PQ (faiss OnDiskInvertedLists, memory-mapped) trained on a sample, "
        "encoded in blocks; its PQ shortlist of re-rank x k candidates is re-ranked with the exact float16 vectors "
        "read from the chunk files (positioned reads). Serving: a fresh process opens the index and answers the "
        "queries one "
        "at a time with one faiss thread; its peak RSS (VmHWM) counts every page it touched, mapped files "
        "included (those pages are the kernel's page cache, shared and evictable; the anonymous column is the "
        "process's own memory). Top-1 agreement against a brute-force scan of the same vectors. Targets at 10M: "
        "serving peak "
        "RAM <= 1.5 GB, p50 <= 10 ms, agreement >= 0.9."
        + (f" {args.note}" if args.note else "")
        + "\n\n"
        + tab
        + ("\n" + ray_table(ray) if ray else "")
    )
    if not args.no_write:
        from mdsection import update_section

        update_section("scale", section, args.output)
        print(f"updated {args.output}")


if __name__ == "__main__":
    main()

"""Local features for re-ranking: extraction, matching and verification cost per extractor/matcher.

Real photos: lund_gps (1024x768). Query 01.jpg against candidates 02..11.jpg (the same
cathedral from nearby viewpoints) as a top-10 re-ranking would see them. Per configuration:
extraction s/image (median over the 11 photos, after one warm-up), matching s/pair and
verification s/pair (medians over the 10 pairs), top-10 s/query = query extraction +
``match_many`` against the 10 candidates + 10 verifications, timed end to end (median of
``--rounds``; also its process CPU time, which on an idle machine with all threads busy is
about threads x wall time: a loaded machine inflates wall time, not CPU time), keypoints per image,
KB per image as stored in hloc's features.h5 (float16
descriptors), and mean verified inliers of the 10 same-building pairs against a different place
(GardensPoint). Torch runs with ``--threads`` threads (default 2, the target machine).

    python benchmarks/local.py                     # all rows, 3 rounds, updates BENCHMARKS.md
    python benchmarks/local.py --only xfeat --rounds 1 --no-write
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from mdsection import update_section  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HAFLOC_SHARED_DATA", REPO.parent / "shared" / "data"))

# (extractor, extractor conf, matcher, matcher conf, note)
CONFIGS = [
    ("xfeat", {}, "lighterglue", {}, ""),
    ("xfeat", {}, "lighterglue", {"max_keypoints": 512}, "matches the best 512"),
    ("xfeat", {"max_keypoints": 512}, "lighterglue", {}, ""),
    ("xfeat", {}, "mnn", {}, ""),
    ("disk", {}, "lightglue", {}, ""),
    ("aliked", {}, "lightglue", {}, ""),
    ("superpoint", {}, "mnn", {}, "random weights: time only"),
]


def run_config(ex_name, ex_conf, m_name, m_conf, rounds: int) -> dict:
    from hafloc.local import create_extractor, create_matcher, stored_bytes, verify

    lund = sorted((DATA / "lund_gps" / "images").glob("*.jpg"))[:11]
    elsewhere = DATA / "gardenspoint_mini" / "nicktrinh_triplets" / "p0" / "i0" / "Image001.jpg"
    ex = create_extractor(ex_name, **ex_conf)
    matcher = create_matcher(m_name, extractor=ex_name, **m_conf)
    ex.extract_path(lund[0])  # warm-up
    ext_times, feats = [], []
    for p in lund:
        t = time.perf_counter()
        feats.append(ex.extract_path(p))
        ext_times.append(time.perf_counter() - t)
    q, cands = feats[0], feats[1:]
    match_times, verify_times, inl = [], [], []
    for c in cands:
        t = time.perf_counter()
        r = matcher.match(q, c)
        match_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        inl.append(verify(q.keypoints, c.keypoints, r.matches).inliers)
        verify_times.append(time.perf_counter() - t)
    other = ex.extract_path(elsewhere)
    other_inl = verify(q.keypoints, other.keypoints, matcher.match(q, other).matches).inliers
    top10, top10_cpu = [], []
    for _ in range(rounds):
        t, c = time.perf_counter(), time.process_time()
        fq = ex.extract_path(lund[0])
        for f, r in zip(cands, matcher.match_many(fq, cands)):
            verify(fq.keypoints, f.keypoints, r.matches)
        top10.append(time.perf_counter() - t)
        top10_cpu.append(time.process_time() - c)
    return {
        "extract": statistics.median(ext_times),
        "match": statistics.median(match_times),
        "verify": statistics.median(verify_times),
        "top10": statistics.median(top10),
        "top10_cpu": statistics.median(top10_cpu),
        "keypoints": statistics.mean(len(f) for f in feats),
        "kb": statistics.mean(stored_bytes(f) for f in feats) / 1024,
        "inliers_same": statistics.mean(inl),
        "inliers_other": other_inl,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", help="run only rows whose extractor or matcher is this")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    header = (
        "| extractor | matcher | extract s/img | match s/pair | verify s/pair | top-10 s/query "
        "| top-10 CPU s/query | keypoints | KB/image (float16) | inliers same building / other place |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    print(header, flush=True)
    for ex_name, ex_conf, m_name, m_conf, note in CONFIGS:
        if args.only and args.only not in (ex_name, m_name):
            continue
        r = run_config(ex_name, ex_conf, m_name, m_conf, args.rounds)
        label = lambda name, c: name + (f" ({', '.join(f'{k}={v}' for k, v in c.items())})" if c else "")  # noqa: E731
        row = (
            f"| {label(ex_name, ex_conf)} | {label(m_name, m_conf)}{' - ' + note if note else ''} | {r['extract']:.3f} "
            f"| {r['match']:.3f} | {r['verify']:.4f} | {r['top10']:.2f} | {r['top10_cpu']:.2f} "
            f"| {r['keypoints']:.0f} | {r['kb']:.0f} "
            f"| {r['inliers_same']:.0f} / {r['inliers_other']} |"
        )
        rows.append(row)
        print(row, flush=True)
    section = (
        f"## Local features (re-ranking cost)\n\n`python benchmarks/local.py` on {date.today()}: "
        f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs while measured, so times "
        f"are upper bounds), torch {torch.__version__} with {args.threads} threads.\n"
        "Query lund_gps/01.jpg against 02..11.jpg (1024x768, resized to 640 px for the networks, "
        "default 1024 keypoints); top-10 = query features + matching + MAGSAC verification of 10 candidates. "
        "Inliers: mean over the 10 same-building pairs / one GardensPoint photo. "
        "On a loaded machine read the CPU column with `--threads 1`: it is the work per query, and an idle "
        "2-core machine with 2 threads does it in a bit over half (LighterGlue at 1024 keypoints: 0.1 s wall "
        "per pair with 2 threads on a quiet machine, 0.2 CPU s with 1).\n\n" + header + "\n" + "\n".join(rows) + "\n"
    )
    if not args.no_write and not args.only:
        update_section("local", section)


if __name__ == "__main__":
    main()

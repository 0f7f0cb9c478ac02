"""Training throughput (tuples/s) per method on this machine, without and with the trunk cache.

One iteration = a batch of tuples (query, positive, N negatives) in one forward pass, the
method's loss (dD for HAF, triplet for the baselines), backward and an Adam step, with the last
backbone stage trainable (the default). Images are real ie_tower_floors frames from
../shared/data, already decoded: this measures the network, not JPEG decoding. "Before" runs
the whole backbone per step (``--trunk-cache no``); "after" reads the frozen groups' output from
the frozen-trunk cache (hafloc/train/trunk_cache.py) and runs the last stage + head; the two
alternate iteration by iteration in one process (same start weights, same images). The cache
build (one pass of the frozen groups per image) is timed on its own. Prints a table and updates
the "Training throughput" section of BENCHMARKS.md (other sections are kept).

    python benchmarks/train.py                       # 224x320, 4 tuples x (2+5) images, 3 timed iterations
    python benchmarks/train.py --methods haf gem --iters 2 --no-write
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hafloc.images.io import load_image, to_tensor
from hafloc.train.config import TrainConfig, parse_image_size
from hafloc.train.loop import build_model, build_optimizer, freeze_backbone, set_train_mode, tuple_loss
from hafloc.train.losses import default_loss_for
from hafloc.train.trunk_cache import DTYPES, CachedTrunkNet, TrunkCache, frozen_groups
from mdsection import update_section

REPO = Path(__file__).resolve().parents[1]


def real_images(n: int) -> list[Path]:
    data = Path(os.environ.get("HAFLOC_SHARED_DATA", REPO.parent / "shared" / "data")) / "ie_tower_floors" / "images"
    return sorted(data.rglob("*.jpg"))[::37][:n] if data.is_dir() else []


def _step(model, frozen, opt, net, batch, tuples: int, negatives: int, loss_name: str) -> float:
    t0 = time.perf_counter()
    set_train_mode(model, frozen)
    opt.zero_grad()
    loss = tuple_loss(net, batch() if callable(batch) else batch, tuples, negatives, loss_name, None)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def measure(
    method: str,
    size: tuple[int, int],
    tuples: int,
    negatives: int,
    iters: int,
    fit: list[Path],
    cache_root: Path,
    dtype: str,
) -> dict:
    """Uncached and trunk-cached training steps of one method, alternated (same start, same images)."""
    cfg = TrainConfig(method=method, dataset="-", output="-", image_size=size, fit_images=len(fit))
    torch.manual_seed(0)
    model, _ = build_model(cfg, fit, progress=False)
    twin = copy.deepcopy(model)
    n_img = tuples * (2 + negatives)
    paths = fit
    order = [i % len(paths) for i in range(n_img)]
    x = torch.stack([to_tensor(load_image(paths[i]), size=size) for i in order])
    loss_name = default_loss_for(method)
    runs = {}
    for name, m in (("uncached", model), ("cached", twin)):
        frozen = freeze_backbone(m, cfg.train_stages)
        runs[name] = {"model": m, "frozen": frozen, "opt": build_optimizer(m, cfg), "times": []}
    # the cache: one pass of the frozen groups over the distinct images (timed on its own)
    cache = TrunkCache(cache_root / method, twin, frozen_groups(twin, cfg.train_stages), size, dtype=dtype)
    t0 = time.perf_counter()
    info = cache.build(paths, lambda i: to_tensor(load_image(paths[i]), size=size), progress=False)
    build_s = time.perf_counter() - t0
    ids = order
    net = CachedTrunkNet(twin, cache.stop)
    for i in range(iters + 1):  # the first iteration warms up allocators and is not counted
        names = ("uncached", "cached") if i % 2 == 0 else ("cached", "uncached")  # alternate who goes first
        for name in names:
            r = runs[name]
            if name == "cached":
                dt = _step(
                    r["model"], r["frozen"], r["opt"], net, lambda: cache.batch(ids), tuples, negatives, loss_name
                )
            else:
                dt = _step(r["model"], r["frozen"], r["opt"], r["model"], x, tuples, negatives, loss_name)
            if i:
                r["times"].append(dt)
    sec = {name: sorted(r["times"])[len(r["times"]) // 2] for name, r in runs.items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "method": method,
        "loss": loss_name,
        "sec_uncached": sec["uncached"],
        "sec_cached": sec["cached"],
        "tuples_uncached": tuples / sec["uncached"],
        "tuples_cached": tuples / sec["cached"],
        "speedup": sec["uncached"] / sec["cached"],
        "images_per_s_cached": n_img / sec["cached"],
        "trainable_params": trainable,
        "build_images": info["computed"],
        "build_s": build_s,
        "bytes_per_image": cache.row_len * np.dtype(DTYPES[dtype]).itemsize,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| method | loss | s / iteration before | after (trunk cache) | tuples / s before | after | speed-up | "
        "cache build, ms / image | cache, KiB / image | trainable params |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    return head + "".join(
        f"| {r['method']} | {r['loss']} | {r['sec_uncached']:.2f} | {r['sec_cached']:.2f} | "
        f"{r['tuples_uncached']:.2f} | "
        f"{r['tuples_cached']:.2f} | {r['speedup']:.2f}x | {1000 * r['build_s'] / max(r['build_images'], 1):.0f} | "
        f"{r['bytes_per_image'] / 1024:.0f} | {r['trainable_params']:,} |\n"
        for r in rows
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["haf", "netvlad", "crn", "gem", "superpoint"])
    ap.add_argument("--image-size", default="224x320")
    ap.add_argument("--tuples", type=int, default=4)
    ap.add_argument("--negatives", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="trunk cache storage")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = parse_image_size(args.image_size)
    fit = real_images(24)
    if not fit:
        raise SystemExit("benchmarks/train.py needs the real images of ../shared/data/ie_tower_floors")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.methods:
            rows.append(measure(m, size, args.tuples, args.negatives, args.iters, fit, Path(tmp), args.dtype))
            r = rows[-1]
            print(
                f"{m}: {r['tuples_uncached']:.2f} -> {r['tuples_cached']:.2f} tuples/s ({r['speedup']:.2f}x)",
                flush=True,
            )
    tab = table(rows)
    print(tab)
    if args.no_write:
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    haf = next((r for r in rows if r["method"] == "haf"), rows[0])
    ms = 1000 * haf["build_s"] / max(haf["build_images"], 1)
    section = (
        "## Training throughput\n\n"
        f"`python benchmarks/train.py` on {time.strftime('%Y-%m-%d')}: {platform.processor() or platform.machine()}, "
        f"{cpus} CPU cores (shared with other jobs while measured: 1-min load average {load:.1f} at the end, so "
        f"times are upper bounds and the ratios are the meaningful figures), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. EfficientNet-Lite0 trunk (SuperPoint: its own network, random init), "
        f"last stage trainable, {size[0]}x{size[1]} images, batches of {args.tuples} tuples x (query + positive + "
        f"{args.negatives} negatives) = {args.tuples * (2 + args.negatives)} images in one forward pass; forward + "
        f"loss + backward + Adam step, median of {args.iters} iterations after one warm-up. Before: the whole "
        "backbone runs per step on pre-decoded images (training caches them in memory for small sets). After: the "
        f"frozen-trunk cache ({args.dtype}, `--trunk-cache`, the default) supplies the frozen groups' output, read "
        "from its memory-mapped shards inside the timed step; before and after alternate iteration by iteration in "
        "one process. Mining refreshes (inference on the training database every --cache-refresh queries) speed "
        "up alike and come on top. The cache build is one pass of the frozen groups per image, counted apart: "
        f"{ms:.0f} ms per image for HAF here, so about {ms * 2877 / 1000 / 60:.1f} min for all 2,877 "
        "ie_tower_floors images, once per backbone, training size and frozen-stage count.\n\n" + tab
    )
    update_section("train", section, args.output)


if __name__ == "__main__":
    main()

"""Training throughput (tuples/s) per method on this machine.

One iteration = a batch of tuples (query, positive, N negatives) in one forward pass, the
method's loss (dD for HAF, triplet for the baselines), backward and an Adam step, with the last
backbone stage trainable (the default). Images are real ie_tower_floors frames when
../shared/data is present (random pixels otherwise), already decoded: this measures the
network, not JPEG decoding. Prints a table and updates the "Training throughput" section of
BENCHMARKS.md (other sections are kept).

    python benchmarks/train.py                       # 224x320, 4 tuples x (2+5) images, 3 timed iterations
    python benchmarks/train.py --methods haf gem --iters 2 --no-write
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from hafloc.images.io import load_image, to_tensor
from hafloc.train.config import TrainConfig, parse_image_size
from hafloc.train.loop import build_model, build_optimizer, freeze_backbone, set_train_mode, tuple_loss
from hafloc.train.losses import default_loss_for
from mdsection import update_section

REPO = Path(__file__).resolve().parents[1]


def real_images(n: int) -> list[Path]:
    data = Path(os.environ.get("HAFLOC_SHARED_DATA", REPO.parent / "shared" / "data")) / "ie_tower_floors" / "images"
    return sorted(data.rglob("*.jpg"))[:: 37][:n] if data.is_dir() else []


def measure(method: str, size: tuple[int, int], tuples: int, negatives: int, iters: int, fit: list[Path]) -> dict:
    cfg = TrainConfig(method=method, dataset="-", output="-", image_size=size, fit_images=len(fit))
    torch.manual_seed(0)
    model, _ = build_model(cfg, fit or None, progress=False)
    frozen = freeze_backbone(model, cfg.train_stages)
    opt = build_optimizer(model, cfg)
    n_img = tuples * (2 + negatives)
    imgs = [to_tensor(load_image(p), size=size) for p in (fit * (n_img // max(len(fit), 1) + 1))[:n_img]] if fit \
        else list(torch.rand(n_img, 3, *size))
    x = torch.stack(imgs)
    loss_name = default_loss_for(method)
    times = []
    for i in range(iters + 1):  # the first iteration warms up allocators and is not counted
        t0 = time.perf_counter()
        set_train_mode(model, frozen)
        opt.zero_grad()
        loss = tuple_loss(model, x, tuples, negatives, loss_name, None)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "loss": loss_name, "sec_per_iter": sec, "tuples_per_s": tuples / sec,
            "images_per_s": n_img / sec, "trainable_params": trainable}


def table(rows: list[dict]) -> str:
    head = "| method | loss | s / iteration | tuples / s | images / s | trainable params |\n|---|---|---:|---:|---:|---:|\n"
    return head + "".join(
        f"| {r['method']} | {r['loss']} | {r['sec_per_iter']:.2f} | {r['tuples_per_s']:.2f} | "
        f"{r['images_per_s']:.1f} | {r['trainable_params']:,} |\n" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["haf", "netvlad", "crn", "gem", "superpoint"])
    ap.add_argument("--image-size", default="224x320")
    ap.add_argument("--tuples", type=int, default=4)
    ap.add_argument("--negatives", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = parse_image_size(args.image_size)
    fit = real_images(24)
    rows = []
    for m in args.methods:
        rows.append(measure(m, size, args.tuples, args.negatives, args.iters, fit))
        print(f"{m}: {rows[-1]['tuples_per_s']:.2f} tuples/s", flush=True)
    tab = table(rows)
    print(tab)
    if args.no_write:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    section = (
        "## Training throughput\n\n"
        f"`python benchmarks/train.py` on {time.strftime('%Y-%m-%d')}: {platform.processor() or platform.machine()}, "
        f"{cpus} CPU cores (shared with other jobs while measured, so times are upper bounds), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads. EfficientNet-Lite0 trunk (SuperPoint: its own "
        f"network, random init), last stage trainable, {size[0]}x{size[1]} images, batches of {args.tuples} tuples "
        f"x (query + positive + {args.negatives} negatives) = {args.tuples * (2 + args.negatives)} images in one "
        f"forward pass; forward + loss + backward + Adam step, median of {args.iters} iterations after one warm-up; "
        "images pre-decoded (training caches them in memory for small sets). Mining and cache refreshes "
        "(inference on the training database every --cache-refresh queries) come on top.\n\n" + tab)
    update_section("train", section, args.output)


if __name__ == "__main__":
    main()

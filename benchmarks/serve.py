"""Server benchmark: concurrent /locate requests with real photos against a real uvicorn process.

Builds a HAF model (pretrained EfficientNet-Lite0, clusters fitted on the photos) and an index of
the real photos in /work/shared/data (landmarks_mini + gardenspoint_mini), starts ``hafloc serve``
on a free loopback port, then runs C client threads x R sequential requests each (httpx), every
request uploading one real photo. A separate thread polls /health meanwhile, to show that the
event loop stays responsive while inference runs. Prints a table and updates the "Serve" section
of BENCHMARKS.md at the repo root (other sections are kept).

    python benchmarks/serve.py                        # 8 clients x 50 requests
    python benchmarks/serve.py --clients 2 --requests 5 --no-write
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from mdsection import update_section

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    return Path(os.environ.get("HAFLOC_SHARED_DATA", REPO.parent / "shared" / "data"))


def real_photos() -> list[Path]:
    data = shared_data()
    photos = sorted((data / "landmarks_mini" / "images").glob("*.jpg"))
    photos += sorted(p for p in (data / "gardenspoint_mini").rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    if not photos:
        sys.exit(f"no photos under {data} (set HAFLOC_SHARED_DATA)")
    return photos


def build(work: Path, photos: list[Path], max_side: int, clusters: int) -> tuple[Path, Path]:
    """Model file and index folder over ``photos`` (copied into one folder: the server refuses
    thumbnails whose resolved path leaves the indexed root, which a symlink would)."""
    import torch

    from hafloc.cli import main as cli
    from hafloc.descriptors.fit import fit_clusters
    from hafloc.descriptors.modelfile import save_model
    from hafloc.descriptors.network import GeoLocNet, ModelConfig

    db = work / "db"
    db.mkdir()
    rows = ["image,lat,lon"]
    for i, p in enumerate(photos):
        shutil.copyfile(p, db / f"{i:03d}_{p.name}")
        # the photos carry no GPS: place them along a line ~30 m apart, so estimates are computed
        rows.append(f"{i:03d}_{p.name},{48.85 + 0.0003 * i:.6f},2.35")
    (work / "positions.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    model = GeoLocNet(ModelConfig.for_method("haf", num_clusters=clusters))
    model.config.max_side = max_side
    fit_clusters(model, sorted(db.iterdir())[::3], samples_per_image=100, progress=False)
    model_path = save_model(model, work / "haf.model")
    index = work / "index"
    argv = [
        "index",
        "build",
        str(db),
        "--model",
        str(model_path),
        "--index",
        str(index),
        "--positions",
        str(work / "positions.csv"),
        "--no-progress",
    ]
    if cli(argv) != 0:
        sys.exit("index build failed")
    return model_path, index


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, backend: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hafloc", "serve", "--index", str(index), "--port", str(port), "--backend", backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a first ONNX export can take a while
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit("server exited:\n" + proc.stdout.read().decode()[-3000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    sys.exit("server did not start")


def run_load(url: str, photos: list[Path], clients: int, requests: int) -> dict:
    payloads = [(p.name, p.read_bytes()) for p in photos]
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            for r in range(requests):
                name, data = payloads[(c * requests + r) % len(payloads)]
                t0 = time.perf_counter()
                try:
                    resp = http.post("/locate?attention=1", files={"file": (name, data, "image/jpeg")})
                    ok = resp.status_code == 200 and resp.json()["results"][0].get("matches")
                    err = None if ok else f"{resp.status_code} {resp.text[:200]}"
                except httpx.HTTPError as e:
                    err = f"{type(e).__name__}: {e}"
                dt = time.perf_counter() - t0
                with lock:
                    (errors.append(err) if err else lat.append(dt))

    health: list[float] = []
    stop = threading.Event()

    def poll_health() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                http.get("/health")
                health.append(time.perf_counter() - t0)
                stop.wait(0.2)

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    stop.set()
    poller.join()
    ms = np.array(lat) * 1000
    hms = np.array(health) * 1000
    return {
        "clients": clients,
        "requests": clients * requests,
        "errors": len(errors),
        "error_samples": errors[:3],
        "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p95": float(np.percentile(ms, 95)) if len(ms) else float("nan"),
        "mean": float(ms.mean()) if len(ms) else float("nan"),
        "rps": len(ms) / wall,
        "wall": wall,
        "health_p50": float(np.percentile(hms, 50)),
        "health_p95": float(np.percentile(hms, 95)),
    }


def table(r: dict) -> str:
    return (
        "| clients x requests | errors | p50 (ms) | p95 (ms) | mean (ms) | requests/s | /health p95 under load (ms) |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {r['clients']} x {r['requests'] // r['clients']} | {r['errors']} | {r['p50']:.0f} | {r['p95']:.0f} | "
        f"{r['mean']:.0f} | {r['rps']:.2f} | {r['health_p95']:.1f} |\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="sequential requests per client")
    ap.add_argument("--max-side", type=int, default=320, help="model input size (longest side)")
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"])
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = ap.parse_args()

    photos = real_photos()
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    with tempfile.TemporaryDirectory(prefix="hafloc-bench-serve-") as tmp:
        t0 = time.perf_counter()
        _, index = build(Path(tmp), photos, args.max_side, args.clusters)
        print(f"model + index of {len(photos)} photos in {time.perf_counter() - t0:.0f} s")
        proc, url = start_server(index, args.backend)
        try:
            for p in photos[:2]:  # warm-up (first ONNX session run, thumbnails cache untouched)
                files = {"file": (p.name, p.read_bytes())}
                httpx.post(url + "/locate?attention=1", files=files, timeout=300).raise_for_status()
            res = run_load(url, photos, args.clients, args.requests)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    tab = table(res)
    print(tab)
    if res["errors"]:
        print("errors, e.g.:", *res["error_samples"], sep="\n  ")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    section = (
        "## Serve (`hafloc serve`, concurrent /locate)\n\n"
        f"`python benchmarks/serve.py` on {time.strftime('%Y-%m-%d')}: {platform.processor() or platform.machine()}, "
        f"{cpus} CPU cores (shared with other jobs while measured, so times are upper bounds), backend "
        f"{args.backend}.\n"
        f"A real uvicorn process on loopback; index of {len(photos)} real photos (landmarks_mini + gardenspoint_mini), "
        f"HAF with EfficientNet-Lite0 (ImageNet weights, {args.clusters} clusters per level), max side "
        f"{args.max_side}. "
        f"{args.clients} client threads x {args.requests} sequential requests, each uploading one real photo "
        "(multipart) and receiving estimate, top-10 matches and three attention overlays (PNG data URLs). "
        "Inference runs in one worker thread using all cores, so requests queue: latency ~ clients x service time. "
        "/health is polled every 0.2 s during the load to show that the event loop stays responsive.\n\n" + tab
    )
    if not args.no_write:
        update_section("serve", section, args.output)
        print(f"updated {args.output}")
    if res["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

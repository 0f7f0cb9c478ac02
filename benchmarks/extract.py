"""Extraction benchmarks: eager torch vs ONNX Runtime, and our HAF vs the official code's design.

1. ``extract``: backbone only vs HAF vs NetVLAD (and CRN, GeM, SuperPoint at 480x640, batch 1)
   at 480x640 and 240x320, batch 1 and 8, on eager torch and ONNX Runtime: images/s, peak memory
   per image, and HAF's throughput relative to the backbone alone.
2. ``reference``: our HAF against a re-implementation of the authors' released design (three
   trunk passes to the low/mid/high taps, 1x1 projections to 128 channels, nearest upsampling to
   stride 4, concatenation, one NetVLAD with K=64 that materialises the (B,K,C,H,W) residual
   tensor), same backbone and input, eager torch, side by side in one run.

3. ``ratio``: HAF vs backbone only under ONNX Runtime, the issue-14 target (>= 0.90x): both
   sessions in one process with the same threads, calls alternated one by one (so the two see the
   same machine load, which on a shared machine swings more than the head costs), per-model medians.
   ``--extra NAME=FILE.onnx`` adds another exported graph to the alternation (e.g. an older head).

Every configuration runs in a fresh subprocess: peak memory is that process's peak RSS
(``ru_maxrss``) minus its RSS once the model is loaded and the input batch is built, divided
by the batch size. Configurations are run round-robin ``--rounds`` times (so a change in the
machine's load hits all of them alike) and medians are reported. Prints the tables and updates
the extraction sections of BENCHMARKS.md (other sections are kept).

    python benchmarks/extract.py                    # both suites, 3 rounds
    python benchmarks/extract.py --only reference --rounds 2 --no-write
    python benchmarks/extract.py --only ratio --rounds 3 --extra haf_before=/tmp/haf_old.onnx
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mdsection import update_section  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SIZES = {"480x640": (480, 640), "240x320": (240, 320)}


# --------------------------------------------------------------------------- models (child side)


def build_torch(method: str):
    """The module timed for ``method``: a GeoLocNet, the bare backbone, or the reference design."""
    import torch

    from hafloc.backbones import create_backbone
    from hafloc.descriptors.network import GeoLocNet, ModelConfig

    torch.manual_seed(0)
    if method == "backbone":
        return create_backbone("efficientnet-lite0").eval()
    if method == "reference":
        return ReferenceDesign(create_backbone("efficientnet-lite0")).eval()
    cfg = ModelConfig.for_method(method)  # paper settings: K=64, 128-D projections for HAF
    return GeoLocNet(cfg, pretrained=method != "superpoint").eval()  # SuperPoint weights: user-supplied


def _reference_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Reference(nn.Module):
        """The authors' released design on Lite0 (what METHOD.md says we do not follow).

        Three trunk passes (one per tap, as their code runs VGG to pool3, pool4 and pool5 separately),
        1x1 projections to 128, nearest upsampling to stride 4, concatenation, one NetVLAD (K=64)
        written as pytorch-NetVlad does: the full (B,K,C,H*W) residual tensor, weighted in place.
        """

        def __init__(self, backbone, proj: int = 128, clusters: int = 64):
            super().__init__()
            self.backbone = backbone
            self.proj = nn.ModuleDict({lv: nn.Conv2d(c, proj, 1) for lv, c in backbone.channels.items()})
            dim = proj * len(self.proj)
            self.assign = nn.Conv2d(dim, clusters, 1, bias=False)
            self.centroids = nn.Parameter(torch.rand(clusters, dim))

        def trunk_to(self, x, level: str):
            b = self.backbone
            y = b.act(b._bn0(b._conv_stem(b.normalize(x))))
            for i, block in enumerate(b._blocks):
                y = block(y)
                if i == b._tap_blocks[level]:
                    return y
            raise AssertionError(level)

        def forward(self, x):
            h, w = x.shape[-2] // 4, x.shape[-1] // 4
            maps = [
                F.interpolate(self.proj[lv](self.trunk_to(x, lv)), size=(h, w), mode="nearest")
                for lv in ("low", "mid", "high")
            ]
            feats = F.normalize(torch.cat(maps, dim=1), p=2, dim=1)
            n, c = feats.shape[:2]
            k = self.centroids.shape[0]
            soft = F.softmax(self.assign(feats).view(n, k, -1), dim=1)
            flat = feats.view(n, c, -1)
            residual = flat.expand(k, -1, -1, -1).permute(1, 0, 2, 3) - self.centroids.expand(
                flat.size(-1), -1, -1
            ).permute(1, 2, 0).unsqueeze(0)
            residual *= soft.unsqueeze(2)
            vlad = F.normalize(residual.sum(dim=-1), p=2, dim=2).view(n, -1)
            return {"descriptor": F.normalize(vlad, p=2, dim=1)}

    return Reference


def ReferenceDesign(backbone):  # noqa: N802 - a factory, imports torch only in children
    return _reference_class()(backbone)


def export_for(method: str, folder: Path) -> Path:
    """ONNX file for ``method`` (the backbone exports its three taps)."""
    import warnings

    import torch

    from hafloc.descriptors.onnx_backend import export_onnx

    path = folder / f"{method}.onnx"
    model = build_torch(method)
    if method != "backbone":
        return export_onnx(model, path)

    class Taps(torch.nn.Module):
        def __init__(self, b):
            super().__init__()
            self.b = b

        def forward(self, x):
            t = self.b(x)
            return t["low"], t["mid"], t["high"]

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Taps(model).eval(),
            (torch.rand(1, 3, 224, 320),),
            str(path),
            input_names=["image"],
            output_names=["low", "mid", "high"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={"image": {0: "b", 2: "h", 3: "w"}},
        )
    return path


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> dict:
    """Time one configuration in this (fresh) process; returns images/s and peak MB per image."""
    import numpy as np
    import torch

    threads = spec["threads"]
    torch.set_num_threads(threads)
    h, w = SIZES[spec["size"]]
    b = spec["batch"]
    x = torch.rand(b, 3, h, w)
    if spec["backend"] == "onnx":
        import onnxruntime as ort

        from hafloc.descriptors.runtime import session_options

        sess = ort.InferenceSession(spec["onnx"], session_options(threads), providers=["CPUExecutionProvider"])
        xn = x.numpy()

        def run():
            sess.run(None, {"image": xn})
    else:
        model = build_torch(spec["method"])
        channels_last = spec["backend"] == "torch-cl"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)

        def run():
            with torch.inference_mode():
                model(x)

    base = _rss_mb()
    run()  # first call: allocations, ORT arena, oneDNN primitives
    times = []
    t_end = time.perf_counter() + spec["min_time"]
    while len(times) < spec["min_iters"] or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "ips": b / float(np.median(times)),
        "mb_per_image": max(0.0, peak - base) / b,
        "iters": len(times),
        "base_mb": base,
    }


def child_ratio(spec: dict) -> dict:
    """Alternate single calls of several ORT sessions (same threads) for ``min_time`` s; medians in s/call."""
    import numpy as np
    import onnxruntime as ort

    from hafloc.descriptors.runtime import session_options

    h, w = SIZES[spec["size"]]
    x = np.random.default_rng(0).random((spec["batch"], 3, h, w), dtype=np.float32)
    sessions = {
        name: ort.InferenceSession(path, session_options(spec["threads"]), providers=["CPUExecutionProvider"])
        for name, path in spec["files"].items()
    }
    times: dict[str, list[float]] = {name: [] for name in sessions}
    cpu: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(None, {"image": x})
    t_end = time.perf_counter() + spec["min_time"]
    while time.perf_counter() < t_end or len(times["backbone"]) < spec["min_iters"]:
        for name, s in sessions.items():
            c0, t0 = time.process_time(), time.perf_counter()
            s.run(None, {"image": x})
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    # CPU seconds (all threads; the sessions do not spin) count the work, not the waits for a core: on an
    # overloaded machine they still compare the two graphs when wall times no longer do
    return {name: float(np.median(v)) for name, v in times.items()} | {
        "calls": len(times["backbone"]),
        "cpu": {n: float(np.median(v)) for n, v in cpu.items()},
    }


def run_ratio(files: dict[str, Path], common: dict, rounds: int) -> dict[tuple, dict]:
    """Per (size, batch): images/s of each graph and its ratio to the backbone, medians over rounds."""
    import numpy as np
    from tqdm import tqdm

    configs = [("480x640", 1), ("480x640", 8), ("240x320", 1), ("240x320", 8)]
    out: dict[tuple, list[dict]] = {}
    bar = tqdm(total=rounds * len(configs), desc="ratio", unit="run", dynamic_ncols=True)
    for _ in range(rounds):
        for size, batch in configs:
            spec = dict(common, size=size, batch=batch, files={k: str(v) for k, v in files.items()}, mode="ratio")
            out.setdefault((size, batch), []).append(run_child(spec))
            bar.update(1)
    bar.close()
    res = {}
    for (size, batch), rs in out.items():
        res[(size, batch)] = {
            name: {
                "ips": float(np.median([batch / r[name] for r in rs])),
                "ratio": float(np.median([r["backbone"] / r[name] for r in rs])),
                "ratios": [round(r["backbone"] / r[name], 3) for r in rs],
                "cpu_ratio": float(np.median([r["cpu"]["backbone"] / r["cpu"][name] for r in rs])),
            }
            for name in files
        }
    return res


def ratio_table(res: dict[tuple, dict]) -> str:
    names = [n for n in next(iter(res.values())) if n != "backbone"]
    out = [
        "| input | batch | backbone img/s | "
        + " | ".join(f"{n} img/s | {n} / backbone (per round) | {n} / backbone, CPU time" for n in names)
        + " |",
        "|---|---|---|" + "---|---|---|" * len(names),
    ]
    for (size, batch), r in res.items():
        cells = [
            f"{r[n]['ips']:.1f} | **{r[n]['ratio']:.2f}x** ({', '.join(f'{v:.2f}' for v in r[n]['ratios'])}) | "
            f"{r[n]['cpu_ratio']:.2f}x"
            for n in names
        ]
        out.append(f"| {size} | {batch} | {r['backbone']['ips']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- orchestration


def run_child(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=REPO
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec}: child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_suite(specs: list[dict], rounds: int, label: str) -> dict[tuple, dict]:
    """Round-robin over ``specs``; the median of each configuration's rounds."""
    import numpy as np
    from tqdm import tqdm

    results: dict[tuple, list[dict]] = {}
    bar = tqdm(total=rounds * len(specs), desc=label, unit="run", dynamic_ncols=True)
    for _ in range(rounds):
        for s in specs:
            key = (s["size"], s["batch"], s["method"], s["backend"])
            results.setdefault(key, []).append(run_child(s))
            bar.update(1)
    bar.close()
    return {
        k: {
            "ips": float(np.median([r["ips"] for r in v])),
            "mb_per_image": float(np.median([r["mb_per_image"] for r in v])),
            "ips_all": [round(r["ips"], 2) for r in v],
        }
        for k, v in results.items()
    }


def extract_specs(onnx_files: dict[str, Path], common: dict) -> list[dict]:
    specs = []
    for size in SIZES:
        for batch in (1, 8):
            methods = ["backbone", "haf", "netvlad"]
            if size == "480x640" and batch == 1:
                methods += ["crn", "gem", "superpoint"]
            for m in methods:
                backends = ["torch", "onnx"] + (["torch-cl"] if m in ("backbone", "haf") and size == "480x640" else [])
                for be in backends:
                    specs.append(
                        dict(
                            common,
                            size=size,
                            batch=batch,
                            method=m,
                            backend=be,
                            onnx=str(onnx_files[m]) if be == "onnx" else None,
                        )
                    )
    return specs


def extract_tables(res: dict[tuple, dict]) -> str:
    names = {
        "backbone": "backbone only (Lite0 taps)",
        "haf": "HAF",
        "netvlad": "NetVLAD",
        "crn": "CRN",
        "gem": "GeM",
        "superpoint": "SuperPoint",
    }
    out = [
        "| input | batch | method | eager torch img/s | ONNX Runtime img/s | ORT speed-up | "
        "torch peak MB/img | ORT peak MB/img |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (size, batch, m, be), r in res.items():
        if be != "torch":
            continue
        o = res[(size, batch, m, "onnx")]
        out.append(
            f"| {size} | {batch} | {names[m]} | {r['ips']:.1f} | {o['ips']:.1f} | {o['ips'] / r['ips']:.2f}x | "
            f"{r['mb_per_image']:.0f} | {o['mb_per_image']:.0f} |"
        )
    out += [
        "",
        "HAF throughput relative to the backbone alone (same backend, same run):",
        "",
        "| input | batch | eager torch | ONNX Runtime |",
        "|---|---|---|---|",
    ]
    for size in SIZES:
        for batch in (1, 8):
            cells = [
                f"{res[(size, batch, 'haf', be)]['ips'] / res[(size, batch, 'backbone', be)]['ips']:.2f}x"
                for be in ("torch", "onnx")
            ]
            out.append(f"| {size} | {batch} | {cells[0]} | {cells[1]} |")
    cl = [(k, v) for k, v in res.items() if k[3] == "torch-cl"]
    if cl:
        out += [
            "",
            "Eager torch, contiguous (NCHW) vs channels_last memory format:",
            "",
            "| input | batch | method | NCHW img/s | channels_last img/s | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for (size, batch, m, _), v in cl:
            r = res[(size, batch, m, "torch")]
            out.append(
                f"| {size} | {batch} | {names[m]} | {r['ips']:.1f} | {v['ips']:.1f} | {v['ips'] / r['ips']:.2f}x |"
            )
    return "\n".join(out) + "\n"


def reference_specs(common: dict) -> list[dict]:
    return [
        dict(common, size=size, batch=1, method=m, backend="torch", onnx=None)
        for size in SIZES
        for m in ("reference", "haf", "backbone")
    ]


def reference_table(res: dict[tuple, dict]) -> str:
    out = [
        "| input (batch 1, eager torch) | official design img/s | our HAF img/s | backbone only img/s | "
        "HAF speed-up | official peak MB/img | HAF peak MB/img | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in SIZES:
        ref, haf, bb = (res[(size, 1, m, "torch")] for m in ("reference", "haf", "backbone"))
        out.append(
            f"| {size} | {ref['ips']:.2f} | {haf['ips']:.1f} | {bb['ips']:.1f} | {haf['ips'] / ref['ips']:.1f}x | "
            f"{ref['mb_per_image']:.0f} | {haf['mb_per_image']:.0f} | "
            f"{ref['mb_per_image'] / max(haf['mb_per_image'], 1e-9):.1f}x |"
        )
    return "\n".join(out) + "\n"


def machine_line(threads: int, load_before: tuple, load_after: tuple, rounds: int) -> str:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"`python benchmarks/extract.py` on {time.strftime('%Y-%m-%d')}: {cpu}, {threads} CPU threads, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; EfficientNet-Lite0, paper settings "
        f"(K=64; HAF 3 x 128-D levels). The machine was shared with other jobs (1-min load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after), so absolute numbers are lower bounds; "
        f"configurations were interleaved and each is the median of {rounds} fresh-process rounds, so "
        f"ratios within a table are the meaningful figures. Peak memory = peak RSS of the process minus "
        f"its RSS after loading the model and building the input, per image.\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["extract", "reference", "ratio"], default=None, help="run one suite")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="ratio suite: also alternate this exported ONNX graph (repeatable)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="fresh-process rounds per configuration (median)")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per round")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child_ratio(spec) if spec.get("mode") == "ratio" else child(spec)))
        return

    threads = args.threads or len(os.sched_getaffinity(0))
    common = {"threads": threads, "min_time": args.min_time, "min_iters": 3}
    suites = [args.only] if args.only else ["reference", "extract"]
    for suite in suites:
        load0 = os.getloadavg()
        if suite == "ratio":
            with tempfile.TemporaryDirectory() as tmp:
                files = {m: export_for(m, Path(tmp)) for m in ("backbone", "haf")}
                files.update(dict(e.split("=", 1) for e in args.extra))
                res = run_ratio(files, common, args.rounds)
            tab = ratio_table(res)
            title = "## HAF vs backbone only under ONNX Runtime, alternated in one process\n\n"
        elif suite == "extract":
            with tempfile.TemporaryDirectory() as tmp:
                files = {
                    m: export_for(m, Path(tmp)) for m in ("backbone", "haf", "netvlad", "crn", "gem", "superpoint")
                }
                res = run_suite(extract_specs(files, common), args.rounds, "extract")
            tab = extract_tables(res)
            title = "## Extraction speed: eager torch vs ONNX Runtime\n\n"
        else:
            res = run_suite(reference_specs(common), args.rounds, "reference")
            tab = reference_table(res)
            title = "## HAF vs the official code's design\n\n"
        text = title + machine_line(threads, load0, os.getloadavg(), args.rounds)
        if suite == "ratio":
            text += (
                "\nBoth graphs (and any --extra) run in one process, one call each in turn, for "
                f"{args.min_time:g} s per round; a ratio is the backbone's median time per call over the "
                "model's, so it is not affected by load that changes between processes. The CPU-time ratio "
                "is the same with each call's process CPU seconds (all threads): the work done, which "
                "waiting for a core on a busy machine does not inflate.\n"
            )
        if suite == "reference":
            text += (
                "\nThe official design runs the trunk three times and builds the (B, K=64, C=384, H/4 x W/4) "
                "residual tensor (1.9 GB at 480x640); ours runs the trunk once and computes VLAD "
                "by matrix products.\n"
            )
        text += "\n" + tab
        print(text)
        if not args.no_write:
            update_section(suite, text, args.output)
            print(f"updated {args.output}")


if __name__ == "__main__":
    main()

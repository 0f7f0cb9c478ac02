"""Where ONNX Runtime spends its time in an exported model: per-node profile, backbone vs head.

Exports the default model of ``--method`` (as benchmarks/extract.py does), runs it under ONNX
Runtime's profiler (``SessionOptions.enable_profiling``) and aggregates the per-node kernel times
by op type and by the node's scope: ``backbone``, ``head.<part>`` (from the exporter's node
names) or ``whitening`` / ``other``. The exporter names a level's modules by their key with a
suffix in call order: ``head.low`` is the level's attention, ``head.low_1`` its projection and
``head.low_2`` its VLAD; unsuffixed ``head`` nodes are ops of the head's own forward (the
projected features' L2 normalisation and the fusion). Each node's time is its median
over the profiled calls. Prints the tables.

    python benchmarks/profile_onnx.py                       # HAF, 480x640, batch 1
    python benchmarks/profile_onnx.py --size 240x320 --batch 8 --top 30
    python benchmarks/profile_onnx.py --write      # also record the tables in BENCHMARKS.md
    python benchmarks/profile_onnx.py --before /tmp/haf_old.onnx   # and a before/after table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract import SIZES, export_for  # noqa: E402
from mdsection import BENCHMARKS_MD, update_section  # noqa: E402


def scope_of(node: str, depth: int) -> str:
    """``/model/head/vlad.mid/Softmax`` -> ``head.vlad.mid`` (depth 2); untraced nodes -> ``other``."""
    parts = [p for p in node.split("/") if p and not p.endswith("Fusion")]  # ORT's fused-node suffixes
    if parts and parts[0] == "model":
        parts = parts[1:]
    if parts and parts[0] == "b":  # extract.py's backbone-only wrapper
        parts[0] = "backbone"
    if not parts or parts[0] not in ("backbone", "head", "whitening"):
        return "other"
    if parts[0] != "head":
        return parts[0]
    inner = [p for p in parts[1:-1]][:depth]
    return ".".join(["head"] + inner)


def profile(onnx_path: Path, size: str, batch: int, runs: int, threads: int) -> list[dict]:
    """Kernel events (name, op, median microseconds per call) of ``runs`` profiled calls after one warm-up."""
    return profile_many([onnx_path], size, batch, runs, threads)[0]


def profile_many(paths: list[Path], size: str, batch: int, runs: int, threads: int) -> list[list[dict]]:
    """``profile`` of several graphs in one process, their calls alternated (so they see the same load)."""
    import numpy as np
    import onnxruntime as ort

    from hafloc.descriptors.runtime import session_options

    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for i, path in enumerate(paths):
            so = session_options(threads)
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, f"ort{i}")
            sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
        h, w = SIZES[size]
        x = np.random.default_rng(0).random((batch, 3, h, w), dtype=np.float32)
        for sess in sessions:
            sess.run(None, {"image": x})
        for _ in range(runs):
            for sess in sessions:
                sess.run(None, {"image": x})
        return [_node_times(json.loads(Path(sess.end_profiling()).read_text())) for sess in sessions]


def _node_times(events: list[dict]) -> list[dict]:
    import numpy as np

    times: dict[tuple[str, str], list[float]] = {}
    seen_runs = 0
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            seen_runs += 1
        if ev.get("cat") != "Node" or not ev["name"].endswith("_kernel_time"):
            continue
        if seen_runs == 0:  # the warm-up call
            continue
        key = (ev["name"][: -len("_kernel_time")], ev["args"].get("op_name", "?"))
        times.setdefault(key, []).append(ev["dur"])
    # the median call of each node: robust to the other jobs of a shared machine
    nodes = [{"name": k[0], "op": k[1], "us": float(np.median(v))} for k, v in times.items()]
    return sorted(nodes, key=lambda t: -t["us"])


def table(rows: list[tuple], total: float, head: str) -> str:
    out = [f"| {head} | ms/call | share |", "|---|---|---|"]
    out += [f"| {k} | {v / 1000:.2f} | {100 * v / total:.1f}% |" for k, v in rows]
    return "\n".join(out)


def compare(before: list[dict], after: list[dict], depth: int) -> str:
    """Before/after: kernel ms per call of the whole graph, the backbone and the head, the head's node
    count, and the head's ms per op type."""

    def summary(nodes):
        head = [n for n in nodes if scope_of(n["name"], depth).startswith("head")]
        ops = defaultdict(float)
        for n in head:
            ops[n["op"]] += n["us"]
        return {
            "all": sum(n["us"] for n in nodes),
            "backbone": sum(n["us"] for n in nodes if scope_of(n["name"], depth) == "backbone"),
            "head": sum(n["us"] for n in head),
            "count": len(head),
            "ops": ops,
        }

    b, a = summary(before), summary(after)
    out = [
        "| per call (calls alternated) | before | after |",
        "|---|---|---|",
        f"| all kernels, ms | {b['all'] / 1000:.2f} | {a['all'] / 1000:.2f} |",
        f"| backbone kernels, ms | {b['backbone'] / 1000:.2f} | {a['backbone'] / 1000:.2f} |",
        f"| head kernels, ms | {b['head'] / 1000:.2f} | {a['head'] / 1000:.2f} |",
        f"| head share of kernel time | {100 * b['head'] / b['all']:.1f}% | {100 * a['head'] / a['all']:.1f}% |",
        f"| head nodes (after ORT's fusions) | {b['count']} | {a['count']} |",
    ]
    for op in sorted(set(b["ops"]) | set(a["ops"]), key=lambda o: -max(b["ops"].get(o, 0), a["ops"].get(o, 0)))[:12]:
        out.append(f"| head {op}, ms | {b['ops'].get(op, 0) / 1000:.2f} | {a['ops'].get(op, 0) / 1000:.2f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="haf")
    ap.add_argument("--onnx", type=Path, help="profile this file instead of exporting --method")
    ap.add_argument("--size", choices=list(SIZES), default="480x640")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20, help="profiled calls (after one warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    ap.add_argument("--top", type=int, default=20, help="slowest nodes to list")
    ap.add_argument(
        "--depth",
        type=int,
        default=1,
        help="head scope depth: 1 = head.low (attention), head.low_1 "
        "(projection), head.low_2 (VLAD); 2 adds the submodule",
    )
    ap.add_argument(
        "--before",
        type=Path,
        help="also profile this graph (e.g. the head before a change), calls "
        "alternated with the profiled one, and add a before/after table",
    )
    ap.add_argument("--write", action="store_true", help="record the tables in BENCHMARKS.md (section onnx_profile)")
    args = ap.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx or export_for(args.method, Path(tmp))
        runs = profile_many([path] + ([args.before] if args.before else []), args.size, args.batch, args.runs, threads)
    nodes = runs[0]
    total = sum(n["us"] for n in nodes)
    by_op, by_scope = defaultdict(float), defaultdict(float)
    for n in nodes:
        n["scope"] = scope_of(n["name"], args.depth)
        by_op[n["op"]] += n["us"]
        by_scope[n["scope"]] += n["us"]
    head_us = sum(v for k, v in by_scope.items() if k.startswith("head"))
    head_ops = defaultdict(float)
    for n in nodes:
        if n["scope"].startswith("head"):
            head_ops[n["op"]] += n["us"]
    import onnxruntime

    rows = [
        (f"{re.sub(r'^/model', '', n['name'])} ({n['op']})", n["us"]) for n in nodes if n["scope"].startswith("head")
    ][: args.top]
    text = (
        "\n\n".join(
            [
                f"`python benchmarks/profile_onnx.py --method {args.method} --size {args.size} --batch {args.batch}"
                f"{' --before OLD.onnx' if args.before else ''}` on "
                f"{time.strftime('%Y-%m-%d')}: onnxruntime {onnxruntime.__version__}, {threads} threads, per-node "
                "kernel "
                f"times (median of {args.runs} profiled calls) on a machine shared with other jobs. {args.method} at "
                f"{args.size} batch {args.batch}: {total / 1000:.2f} ms of kernels per call, of which the head "
                f"{head_us / 1000:.2f} ms = {100 * head_us / total:.1f}%.",
                table(sorted(by_scope.items(), key=lambda kv: -kv[1]), total, "scope"),
                table(sorted(by_op.items(), key=lambda kv: -kv[1])[: args.top], total, "op type (all)"),
                table(sorted(head_ops.items(), key=lambda kv: -kv[1]), total, "op type (head only)"),
                table(rows, total, "slowest head nodes"),
            ]
            + ([compare(runs[1], nodes, args.depth)] if args.before else [])
        )
        + "\n"
    )
    print(text)
    if args.write:
        update_section(
            "onnx_profile", "## Where ONNX Runtime spends its time (per-node profile)\n\n" + text, BENCHMARKS_MD
        )
        print(f"updated {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()

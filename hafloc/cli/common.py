"""Helpers shared by subcommands."""

from __future__ import annotations

import json
import sys


def add_backend_args(p) -> None:
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                   help="inference engine: ONNX Runtime is 2.5-4x faster on CPU; auto = ONNX Runtime when installed")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--max-side", type=int, default=None,
                   help="resize so the longest side is about this many pixels (multiples of 32; default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def make_extractor(model, args):
    from ..descriptors.extract import Extractor

    return Extractor(model, batch_size=args.batch_size, max_side=args.max_side, backend=args.backend,
                     num_threads=args.threads)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def report_failures(failures: list[tuple[str, str]], total: int) -> None:
    if failures:
        print(f"skipped {len(failures)} of {total} file(s):", file=sys.stderr)
        for name, reason in failures:
            print(f"  {name}: {reason}", file=sys.stderr)

"""The ``hafloc`` command. Each subcommand lives in its own module with a ``register(sub)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .._version import __version__
from ..errors import HaflocError

# Order = order in --help. A module that is absent is simply not offered.
_COMMANDS = [
    "demo",
    "model",
    "extract",
    "eval",
    "compare",
    "dataset",
    "train",
    "tune_weights",
    "index",
    "locate",
    "serve",
    "export_onnx",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hafloc",
        description=(
            "Visual geo-localization: where was this photo taken? Builds global descriptors with "
            "Hierarchical Attention Fusion (HAF) or the NetVLAD / CRN / GeM / SuperPoint baselines, "
            "evaluates them on the standard benchmarks and localizes your own photos."
        ),
        epilog="Run 'hafloc COMMAND --help' for the options of one command. Start with 'hafloc demo --quick'.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging details")
    parser.add_argument("--version", action="version", version=f"hafloc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__name__}.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit status 2 on a ``HaflocError`` (printed as one line)."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # surface a closed pipe here, not in the interpreter's exit handler
    except BrokenPipeError:
        # The reader went away (``hafloc ... | head``): stop quietly as Unix tools do on SIGPIPE.
        # Later flushes (at exit) go to /dev/null so Python prints no "Exception ignored" either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13  # what a shell reports for a process ended by SIGPIPE


def _run(argv: list[str] | None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 file name prints escaped, never crashes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # "Successfully loaded faiss" is noise
    from ..images.io import quiet_bomb_warning

    quiet_bomb_warning()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if hasattr(args, "threads"):  # process-wide, so the application's call (library code never sets it)
        from ..descriptors.runtime import apply_threads

        apply_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except HaflocError as err:
        print(f"hafloc: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hafloc: interrupted (finished work is saved; rerun to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

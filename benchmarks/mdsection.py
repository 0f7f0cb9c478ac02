"""Shared by the benchmark scripts: replace one marked section of BENCHMARKS.md."""

from __future__ import annotations

import re
from pathlib import Path

from hafloc.fileio import write_text_atomic

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def update_section(name: str, section: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the block between ``<!-- benchmark:NAME:begin/end -->``; every other
    section is kept. Written atomically, so concurrent benchmarks never leave a torn file."""
    begin, end = f"<!-- benchmark:{name}:begin -->", f"<!-- benchmark:{name}:end -->"
    text = path.read_text() if path.exists() else "# hafloc benchmarks\n"
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(path, text if text.endswith("\n") else text + "\n")

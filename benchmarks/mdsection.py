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


def finish_table(name: str, title: str, prose: str, lines: list[str], write: bool) -> str:
    """Print a benchmark's markdown table and, with ``write``, record it as section ``name``
    (heading ``title``, then ``prose`` with the machine and the date, then the table)."""
    import platform
    import time

    table = "\n".join(lines)
    print(table)
    if write:
        stamp = f"{platform.machine()}, {time.strftime('%Y-%m-%d')}."
        update_section(name, f"## {title}\n\n{prose} {stamp}\n\n{table}\n")
    return table

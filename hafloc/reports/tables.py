"""Result tables as Markdown (for READMEs / terminals) and escaped HTML (for the report)."""

from __future__ import annotations

import html
import math
from typing import Mapping, Sequence

import numpy as np


def format_cell(value: object, floatfmt: str = ".2f", missing: str = "") -> str:
    """One cell as text: floats with ``floatfmt``, NaN as "nan", None/absent as ``missing``."""
    if value is None:
        return missing
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return "nan" if math.isnan(v) else format(v, floatfmt)
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def _is_numeric(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def markdown_table(
    rows: Sequence[Mapping[str, object]], columns: Sequence[str], floatfmt: str = ".2f", missing: str = ""
) -> str:
    """A GitHub-flavoured Markdown table; numeric columns right-aligned, pipes in text escaped."""
    if not columns:
        raise ValueError("markdown_table needs at least one column")

    def esc(s: str) -> str:
        # a raw '|' would split the cell, a newline would end the row
        return s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")

    body = [[esc(format_cell(r.get(c), floatfmt, missing)) for c in columns] for r in rows]
    numeric = [
        bool(rows)
        and all(_is_numeric(r.get(c)) or r.get(c) is None for r in rows)
        and any(_is_numeric(r.get(c)) for r in rows)
        for c in columns
    ]
    lines = [
        "| " + " | ".join(esc(str(c)) for c in columns) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def html_table(
    rows: Sequence[Mapping[str, object]],
    columns: Sequence[str],
    floatfmt: str = ".2f",
    missing: str = "",
    headers: Mapping[str, str] | None = None,
    caption: str | None = None,
) -> str:
    """An HTML ``<table>`` with every header and cell escaped; numeric cells get class "num".

    ``headers`` maps a column key to the label shown (defaults to the key).
    """
    if not columns:
        raise ValueError("html_table needs at least one column")
    e = html.escape
    out = ["<table>"]
    if caption:
        out.append(f"<caption>{e(caption)}</caption>")
    out.append(
        "<thead><tr>" + "".join(f"<th>{e(str((headers or {}).get(c, c)))}</th>" for c in columns) + "</tr></thead>"
    )
    out.append("<tbody>")
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cls = ' class="num"' if _is_numeric(v) else ""
            cells.append(f"<td{cls}>{e(format_cell(v, floatfmt, missing))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)

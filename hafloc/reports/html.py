"""A small self-contained HTML report: inline CSS, no scripts, no external resources.

Images are referenced by paths relative to the report folder, so the folder can be moved or
zipped as a whole. Every piece of user text is HTML-escaped.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence
from urllib.parse import quote

from hafloc.errors import InputError
from hafloc.fileio import atomic_path
from hafloc.reports.tables import html_table


@dataclass
class Table:
    """Rows (dicts) shown under ``columns``; ``headers`` relabels columns."""

    rows: Sequence[Mapping[str, object]]
    columns: Sequence[str]
    caption: str | None = None
    floatfmt: str = ".2f"
    headers: Mapping[str, str] | None = None


@dataclass
class ReportImage:
    """An image file, ``path`` relative to the report folder (absolute paths inside it are accepted)."""

    path: str | Path
    caption: str = ""


@dataclass
class Section:
    """One heading with optional paragraphs, tables, images and a preformatted block."""

    heading: str
    paragraphs: Sequence[str] = field(default_factory=list)
    tables: Sequence[Table] = field(default_factory=list)
    images: Sequence[ReportImage] = field(default_factory=list)
    pre: str | None = None
    pre_caption: str | None = None


_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #1d2430;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 48px; background: #fff;
  min-height: 100vh; box-shadow: 0 0 12px rgba(0,0,0,.06); }
header { border-bottom: 2px solid #2b5797; margin-bottom: 12px; padding-bottom: 8px; }
h1 { font-size: 1.7em; margin: .2em 0; color: #1b3a6b; }
header .meta { color: #667; font-size: .85em; }
section { margin: 28px 0; }
h2 { font-size: 1.25em; color: #1b3a6b; border-bottom: 1px solid #dde2ea; padding-bottom: 4px; }
p { margin: .5em 0 .8em; }
table { border-collapse: collapse; margin: 12px 0 18px; font-size: .92em; min-width: 40%; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 4px; color: #334; }
th, td { border: 1px solid #c5ccd6; padding: 5px 10px; text-align: left; }
th { background: #e8edf5; font-weight: 600; }
tbody tr:nth-child(even) { background: #f8f9fb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.table-wrap { overflow-x: auto; }
figure { margin: 14px 0 22px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #dde2ea; border-radius: 3px; }
figcaption { color: #556; font-size: .88em; margin-top: 5px; }
pre { background: #f6f8fa; border: 1px solid #dde2ea; border-radius: 4px; padding: 10px 12px;
  overflow-x: auto; font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
footer { color: #889; font-size: .8em; border-top: 1px solid #dde2ea; padding-top: 8px; margin-top: 36px; }
"""


def _image_src(out_dir: Path, img: ReportImage) -> str:
    """Relative, URL-quoted ``src``; the file must exist inside ``out_dir`` (no broken images)."""
    p = Path(img.path)
    if p.is_absolute():
        try:
            p = p.resolve().relative_to(out_dir.resolve())
        except ValueError:
            raise InputError(img.path, f"report images must lie inside the report folder {out_dir}") from None
    if ".." in p.parts:
        raise InputError(img.path, f"report images must lie inside the report folder {out_dir}")
    if not (out_dir / p).is_file():
        raise InputError(out_dir / p, "report image not found")
    return quote(PurePosixPath(*p.parts).as_posix())


def render_report(out_dir: Path, title: str, sections: Sequence[Section], footer: str | None = None) -> str:
    """The report's HTML text (checks that every image exists under ``out_dir``)."""
    e = html.escape
    out_dir = Path(out_dir)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        f'<header><h1>{e(title)}</h1><div class="meta">generated {e(time.strftime("%Y-%m-%d %H:%M:%S"))}'
        "</div></header>",
    ]
    for s in sections:
        parts.append("<section>")
        parts.append(f"<h2>{e(s.heading)}</h2>")
        parts += [f"<p>{e(p)}</p>" for p in s.paragraphs]
        for t in s.tables:
            parts.append(
                '<div class="table-wrap">'
                + html_table(t.rows, t.columns, floatfmt=t.floatfmt, headers=t.headers, caption=t.caption)
                + "</div>"
            )
        for img in s.images:
            src = _image_src(out_dir, img)
            cap = f"<figcaption>{e(img.caption)}</figcaption>" if img.caption else ""
            parts.append(f'<figure><img src="{e(src)}" alt="{e(img.caption or Path(img.path).name)}">{cap}</figure>')
        if s.pre is not None:
            if s.pre_caption:
                parts.append(f"<p><strong>{e(s.pre_caption)}</strong></p>")
            parts.append(f"<pre>{e(s.pre)}</pre>")
        parts.append("</section>")
    parts.append(f"<footer>{e(footer or 'hafloc report')}</footer>")
    parts += ["</main>", "</body>", "</html>", ""]
    return "\n".join(parts)


def write_report(out_dir: str | Path, title: str, sections: Sequence[Section], footer: str | None = None) -> Path:
    """Write ``out_dir/index.html`` atomically and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = render_report(out_dir, title, sections, footer)
    path = out_dir / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # explicit: the page declares utf-8
    return path

"""Small helpers shared by the dataset readers."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from hafloc.errors import InputError
from hafloc.images.io import image_files


def list_images(folder: Path, root: Path | None = None, recursive: bool = True) -> list[str]:
    """Image files under ``folder`` as posix paths relative to ``root`` (default: folder), in
    ``images.io.image_files`` order (natural order, hidden names skipped)."""
    root = folder if root is None else root
    return [p.relative_to(root).as_posix() for p in image_files(folder, recursive)]


def read_text(path: Path, what: str = "CSV") -> str:
    """A UTF-8 text file (BOM allowed); InputError naming the real problem: unreadable, empty, or
    another encoding (names in it must match file names, so we do not guess an encoding)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(path, f"cannot read {what} ({e.strerror or e.__class__.__name__})") from None
    if not data.strip():
        raise InputError(path, f"empty {what} file" if not data else f"{what} file holds only blank space")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(
            path,
            f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}; "
            "Latin-1 or a Windows code page? save it as UTF-8)",
        ) from None


def read_csv_rows(path: Path, required: list[str] | tuple[str, ...] = ()) -> tuple[list[str], list[dict[str, str]]]:
    """Header + rows of a CSV; InputError on missing columns or ragged rows."""
    lines = read_text(path).splitlines()
    if not lines or not lines[0].strip():
        raise InputError(path, "empty CSV (no header)")
    reader = csv.reader(lines)
    header = [h.strip() for h in next(reader)]
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(missing)}; header is {','.join(header)}")
    rows = []
    for lineno, rec in enumerate(reader, start=2):
        if not rec or all(not x.strip() for x in rec):
            continue
        if len(rec) != len(header):
            raise InputError(path, f"line {lineno}: {len(rec)} fields, header has {len(header)}")
        rows.append({h: v.strip() for h, v in zip(header, rec)})
    return header, rows


def in_both(
    src: Path,
    db_names: list[str],
    q_names: list[str],
    log: logging.Logger,
    sides: tuple[str, str] = ("gallery", "query"),
) -> set[str]:
    """Images listed as both database (gallery) and query, with a warning naming the count and what
    is done: the reader keeps them as queries and removes them from the database, so that no
    query retrieves itself (for layouts whose names share one root: label CSVs, position CSVs)."""
    queries = set(q_names)
    both = [n for n in db_names if n in queries]
    if both:
        log.warning(
            "%s: %d image(s) listed as both %s and %s (e.g. %s): kept as queries, removed from the %s "
            "so that no query retrieves itself",
            src,
            len(set(both)),
            sides[0],
            sides[1],
            both[0],
            sides[0],
        )
    return set(both)


def parse_float(path: Path, value: str, what: str, lineno: int | None = None) -> float:
    try:
        v = float(value)
    except ValueError:
        where = f"line {lineno}: " if lineno is not None else ""
        raise InputError(path, f"{where}{what} {value!r} is not a number") from None
    if not np.isfinite(v):
        raise InputError(path, f"{what} {value!r} is not finite")
    return v


def swap_missing_ext(root: Path, names: list[str], alts: tuple[str, ...] = (".png", ".jpg")) -> list[str]:
    """Tokyo 24/7 lists '.jpg' names whose files are '.png' (or vice versa): fix the extension
    for the whole list when the first listed file is missing but its alternative exists."""
    if not names:
        return names
    first = root / names[0]
    if first.exists():
        return names
    stem, ext = Path(names[0]).with_suffix(""), Path(names[0]).suffix
    for alt in alts:
        if alt != ext.lower() and (root / stem.with_suffix(alt)).exists():
            return [str(Path(n).with_suffix(alt).as_posix()) for n in names]
    return names

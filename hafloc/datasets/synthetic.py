"""Reading the synthetic demo city: its ``meta.json`` (per-image place, condition, size class).

The format's constants live here, with its reader; the generator, :mod:`hafloc.synth` (a layer
above: it writes the '@' layout this package reads), imports them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hafloc.datasets.atfolders import SPLITS, at_name
from hafloc.errors import InputError

SIZE_CLASSES = ("small", "medium", "large")
CONDITIONS = ("day", "dusk", "night")
META_NAME = "meta.json"
FORMAT_VERSION = 1
# Recorded in meta.json: a folder is this generator's to replace. The module path of the day the
# format began; kept so that worlds written before the generator moved stay recognised.
GENERATOR = "hafloc.datasets.synthetic"

__all__ = [
    "size_classes",
    "read_meta",
    "at_name",
    "SIZE_CLASSES",
    "CONDITIONS",
    "SPLITS",
    "META_NAME",
    "FORMAT_VERSION",
    "GENERATOR",
]


def read_meta(root: str | Path) -> dict[str, Any]:
    """The generator's ``meta.json`` of ``root`` (raises InputError if missing or malformed)."""
    path = Path(root) / META_NAME
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "missing: not a synthetic city folder") from None
    except (OSError, ValueError) as e:
        raise InputError(path, f"unreadable ({e})") from None
    if not isinstance(meta, dict) or "splits" not in meta:
        raise InputError(path, "no 'splits' entry: not a synthetic city meta file")
    return meta


def size_classes(root: str | Path) -> dict[str, str]:
    """Query file (relative to ``root``, e.g. ``images/test/queries/@...@.jpg``) -> size class."""
    meta = read_meta(root)
    return {q["file"]: q["size"] for split in meta["splits"].values() for q in split.get("queries", [])}

"""Interop with hloc (Hierarchical-Localization): global-descriptor HDF5 and retrieval pairs.

hloc stores one HDF5 group per image name (names containing '/' become nested groups, as h5py
creates them) holding the dataset ``global_descriptor`` (D,); hloc lists names as the parents of
datasets. A pairs file has one ``query db`` line per retrieved image, top-k per query, lines
joined by '\\n' without a trailing newline (as ``hloc.pairs_from_retrieval`` writes it); database
pairs for hloc's triangulation are the same selection with the database as the queries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from hafloc.errors import InputError
from hafloc.fileio import write_text_atomic
from hafloc.hloc_h5 import list_h5_names, write_h5_groups
from hafloc.index.search import knn
from hafloc.index.store import IndexStore


def _check_name(name: str) -> str:
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"image name {name!r} cannot be written in hloc's space-separated formats")
    return name.strip("/")


def write_global_descriptors(
    path: str | Path,
    names: Sequence[str],
    descriptors: np.ndarray,
    as_half: bool = False,
    image_sizes: np.ndarray | None = None,
) -> None:
    """Write (N, D) descriptors in hloc's global-feature layout (atomically, replacing ``path``).

    ``as_half`` stores float16 as hloc's extractor does by default; ``image_sizes`` (N, 2) (w, h)
    adds hloc's ``image_size`` dataset.
    """
    desc = np.asarray(descriptors)
    if desc.ndim != 2 or len(desc) != len(names):
        raise ValueError(f"{len(names)} names for descriptors of shape {desc.shape}")
    desc = desc.astype(np.float16 if as_half else np.float32)
    for name in names:
        _check_name(name)

    def groups():
        for i, name in enumerate(names):
            data = {"global_descriptor": desc[i]}
            if image_sizes is not None:
                data["image_size"] = np.asarray(image_sizes[i])
            yield name, data

    write_h5_groups(path, groups())


def read_global_descriptors(path: str | Path, names: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Read ``global_descriptor`` of ``names`` (default: all, in file order) as float32 (N, D)."""
    names = list(names) if names is not None else list_h5_names(path)
    try:
        with h5py.File(path, "r") as fd:
            missing = [n for n in names if n not in fd or "global_descriptor" not in fd[n]]
            if missing:
                raise InputError(path, f"no global_descriptor for {missing[0]!r} ({len(missing)} names missing)")
            desc = np.stack([fd[n]["global_descriptor"][()] for n in names]) if names else np.zeros((0, 0))
    except OSError as err:
        raise InputError(path, f"not a readable HDF5 file ({err})") from None
    return names, desc.astype(np.float32)


def scored_pairs(
    query_names: Sequence[str], query_desc: np.ndarray, db_names: Sequence[str], db_desc: np.ndarray, k: int
) -> list[tuple[str, str, float]]:
    """Top-k (query, db, similarity) by exact inner product, best first; a query never pairs with itself."""
    if len(query_names) == 0 or len(db_names) == 0:
        return []
    overlap = bool(set(query_names) & set(db_names))
    sims, ids = knn(np.asarray(db_desc), np.asarray(query_desc), k + 1 if overlap else k)
    out: list[tuple[str, str, float]] = []
    for q, srow, row in zip(query_names, sims, ids):
        picked = [(db_names[i], float(s)) for s, i in zip(srow, row) if i >= 0 and db_names[i] != q][:k]
        out.extend((q, d, s) for d, s in picked)
    return out


def retrieval_pairs(
    query_names: Sequence[str],
    query_desc: np.ndarray,
    db_names: Sequence[str],
    db_desc: np.ndarray,
    k: int,
    min_score: float | None = 0.0,
) -> list[tuple[str, str]]:
    """Top-k (query, db) pairs by exact cosine similarity, best first, as hloc's
    ``pairs_from_retrieval`` selects them: no self pairs, and candidates with similarity below
    ``min_score`` dropped (hloc passes ``min_score=0``; they exist once a model is PCA-whitened),
    so a query may get fewer than k. ``min_score=None`` keeps every candidate."""
    return [
        (q, d)
        for q, d, s in scored_pairs(query_names, query_desc, db_names, db_desc, k)
        if min_score is None or s >= min_score
    ]


def write_pairs(path: str | Path, pairs: Sequence[tuple[str, str]]) -> None:
    """Write pairs in hloc's format (``query db`` per line), atomically; names that are not UTF-8
    as their raw bytes, the same bytes as their HDF5 group names (``hloc_h5.h5_name``)."""
    text = "\n".join(f"{_check_name(q)} {_check_name(d)}" for q, d in pairs)
    write_text_atomic(path, text, errors="surrogateescape")


def export_store(store: IndexStore, path: str | Path, as_half: bool = False) -> int:
    """Write every descriptor of an index folder to an hloc global-feature file; returns the count."""
    _, names, desc = store.descriptors()
    write_global_descriptors(path, names, desc, as_half=as_half)
    return len(names)


def write_local_exports(
    folder: str | Path,
    store: IndexStore,
    matcher,
    query_features: dict,
    pairs: Sequence[tuple[str, str]],
    db_names: Sequence[str],
    every_db: bool = False,
    progress: bool = True,
) -> tuple[Path, Path, int]:
    """``features.h5`` (the index's local features of the paired images, of every database image
    with ``every_db``, plus the queries') and ``matches.h5`` (``matches0`` / ``matching_scores0``,
    the matcher's output as hloc's match_features writes it, before any geometric verification).

    ``db_names`` name the index's images in ``store.descriptors()`` order. A pair and its reverse
    are matched once (hloc reads either order; its own match_features skips the reverse too).
    Features are read from the index as needed, never all at once: a database export of a large
    index streams. Returns the two paths and the number of matched pairs.
    """
    from tqdm import tqdm

    from hafloc.local import write_local_features, write_matches

    folder = Path(folder)
    ids, _, _ = store.descriptors()
    id_of = {n: int(i) for n, i in zip(db_names, ids)}

    def features(names: Sequence[str]) -> dict:
        """Features by name: the index's for database images (a query that is one is the same file)."""
        got = store.local_features([id_of[n] for n in names if n in id_of])
        return {n: got[id_of[n]] if n in id_of else query_features[n] for n in names}

    needed = list(db_names) if every_db else sorted({n for pair in pairs for n in pair if n in id_of})

    def feature_items():
        for start in range(0, len(needed), 256):
            yield from features(needed[start : start + 256]).items()
        yield from ((q, f) for q, f in query_features.items() if q not in id_of)

    partners: dict[str, list[str]] = {}
    seen: set[frozenset[str]] = set()
    for a, b in pairs:
        if frozenset((a, b)) not in seen:
            seen.add(frozenset((a, b)))
            partners.setdefault(a, []).append(b)

    def match_items():
        for a, bs in tqdm(partners.items(), desc="match", unit="image", disable=not progress):
            feats = features([a, *bs])
            for b, m in zip(bs, matcher.match_many(feats[a], [feats[b] for b in bs])):
                yield (a, b), m.to_matches0(len(feats[a]))

    fpath, mpath = folder / "features.h5", folder / "matches.h5"
    write_local_features(fpath, feature_items(), append=False)
    write_matches(mpath, match_items(), append=False)  # a fresh file: no pair of an earlier export stays
    return fpath, mpath, len(seen)

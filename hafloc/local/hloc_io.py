"""Local features and matches in hloc's files (``features.h5``, ``matches.h5``).

features.h5: a group per image name ('/' -> nested groups) with ``keypoints`` (N,2) float32
(pixels, centre of the top-left pixel = (0,0)), ``descriptors`` (D,N) float16, ``scores`` (N,)
float16 and ``image_size`` (2,) (width, height). matches.h5: a group ``names_to_pair(q, db)``
with ``matches0`` (N0,) int32 (-1 = unmatched) and ``matching_scores0`` (N0,) float16, as
hloc's ``match_features`` writes them (hloc reads either pair order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, TypeVar

import h5py
import numpy as np

from ..errors import InputError
from ..hloc_h5 import h5_name, list_h5_names, names_to_pair, write_h5_groups
from .features import LocalFeatures, MatchResult

K = TypeVar("K")
V = TypeVar("V")


def _items(items: Mapping[K, V] | Iterable[tuple[K, V]]) -> Iterable[tuple[K, V]]:
    """A mapping's items, or an iterable of (key, value) as is: a generator streams a large export."""
    return items.items() if isinstance(items, Mapping) else items


def feature_datasets(f: LocalFeatures) -> dict[str, np.ndarray]:
    """The datasets of one image's group (what is stored: float16 descriptors, as hloc's ``as_half``)."""
    return {
        "keypoints": f.keypoints.astype(np.float32),
        "descriptors": np.ascontiguousarray(f.descriptors.T.astype(np.float16)),
        "scores": f.scores.astype(np.float16),
        "image_size": np.asarray(f.image_size, dtype=np.int64),
    }


def stored_bytes(f: LocalFeatures) -> int:
    """Bytes of one image's datasets in features.h5 (HDF5's own overhead not counted)."""
    return sum(a.nbytes for a in feature_datasets(f).values())


def write_local_features(
    path: str | Path,
    items: Mapping[str, LocalFeatures] | Iterable[tuple[str, LocalFeatures]],
    append: bool = True,
) -> None:
    """Write (or add, ``append``) images' features to an hloc ``features.h5``; atomic, locked."""
    write_h5_groups(path, ((name, feature_datasets(f)) for name, f in _items(items)), append=append)


def read_local_features(path: str | Path, name: str) -> LocalFeatures:
    """One image's features from an hloc features file (ours or hloc's own; any float dtype)."""
    try:
        with h5py.File(path, "r") as fd:
            key = h5_name(name)
            if key not in fd or "keypoints" not in fd[key]:
                raise InputError(path, f"no local features for {name!r}")
            grp = fd[key]
            kp = grp["keypoints"][()].astype(np.float32)
            desc = (
                grp["descriptors"][()].astype(np.float32).T
                if "descriptors" in grp
                else np.zeros((len(kp), 0), np.float32)
            )
            scores = grp["scores"][()].astype(np.float32) if "scores" in grp else np.ones(len(kp), np.float32)
            w, h = (int(v) for v in grp["image_size"][()]) if "image_size" in grp else (0, 0)
    except OSError as err:
        raise InputError(path, f"not a readable HDF5 file ({err})") from None
    return LocalFeatures(kp, desc, scores, (w, h))


def list_feature_names(path: str | Path) -> list[str]:
    """Image names with local features (keypoints) in an hloc features file."""
    names = list_h5_names(path)
    with h5py.File(path, "r") as fd:
        return [n for n in names if "keypoints" in fd[n]]


def write_matches(
    path: str | Path,
    pairs: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]]
    | Iterable[tuple[tuple[str, str], tuple[np.ndarray, np.ndarray]]],
    append: bool = True,
) -> None:
    """Write hloc's ``matches.h5``: ``pairs[(q, db)] = (matches0 (N0,), matching_scores0 (N0,))``.

    ``MatchResult.to_matches0(len(f0))`` gives that form from a match result.
    """

    def groups():
        for (q, db), (m0, s0) in _items(pairs):
            m0 = np.asarray(m0).reshape(-1)
            s0 = np.asarray(s0).reshape(-1)
            if len(m0) != len(s0):
                raise ValueError(f"pair {q!r} {db!r}: {len(m0)} matches0 but {len(s0)} scores")
            # write_h5_groups turns the key into its group path (h5_name)
            yield (
                names_to_pair(q.strip("/"), db.strip("/")),
                {"matches0": m0.astype(np.int32), "matching_scores0": s0.astype(np.float16)},
            )

    write_h5_groups(path, groups(), append=append)


def read_matches(path: str | Path, name0: str, name1: str) -> MatchResult:
    """Matches of a pair (indices into name0's then name1's keypoints), either pair order, as hloc finds them."""
    try:
        with h5py.File(path, "r") as fd:
            for a, b, flip in ((name0, name1, False), (name1, name0, True)):
                key = h5_name(names_to_pair(a.strip("/"), b.strip("/")))
                if key in fd:
                    m0 = fd[key]["matches0"][()]
                    s0 = fd[key]["matching_scores0"][()] if "matching_scores0" in fd[key] else None
                    res = MatchResult.from_matches0(m0, s0)
                    return MatchResult(res.matches[:, ::-1], res.scores) if flip else res
    except OSError as err:
        raise InputError(path, f"not a readable HDF5 file ({err})") from None
    raise InputError(path, f"no matches for the pair {name0!r} {name1!r}")

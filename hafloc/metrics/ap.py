"""Average precision as in revisitop (trapezoidal over ranks after junk removal)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def compute_ap(pos_ranks: np.ndarray, nres: int) -> float:
    """revisitop ``compute_ap``: ``pos_ranks`` are the sorted 0-based ranks of the positives
    (junk already removed), ``nres`` the total number of positives."""
    if nres <= 0:
        return float("nan")
    r = np.asarray(pos_ranks, dtype=np.float64)
    j = np.arange(len(r), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        prec0 = np.where(r == 0, 1.0, j / np.where(r == 0, 1.0, r))
    prec1 = (j + 1) / (r + 1)
    return float(np.sum((prec0 + prec1) / 2.0) / nres)


def positive_ranks(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray | None = None) -> np.ndarray:
    """Sorted 0-based positions of the positives in ``ranking`` once junk entries are removed."""
    ranking = np.asarray(ranking)
    pos = np.flatnonzero(np.isin(ranking, positives))
    if junk is not None and len(junk):
        jpos = np.flatnonzero(np.isin(ranking, junk) & ~np.isin(ranking, positives))
        pos = pos - np.searchsorted(jpos, pos)  # each junk entry ranked earlier shifts a positive up
    return pos


def average_precision(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray | None = None) -> float:
    """AP of one query's full ranking; NaN when it has no positives."""
    positives = np.asarray(positives).ravel()
    return compute_ap(positive_ranks(ranking, positives, junk), len(positives))


def mean_average_precision(
    ranks: np.ndarray,
    positives: Sequence[np.ndarray],
    junk: Sequence[np.ndarray] | None = None,
    kappas: Sequence[int] = (),
) -> dict:
    """mAP (percent) over queries with positives (revisitop ``compute_map``), per-query APs, and
    mP@k (revisitop's definition: precision at min(k, rank of the last positive)).

    ``ranks``: (Nq, K) ranked database indices, K = the whole database for exact AP.
    """
    nq = len(positives)
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for i in range(nq):
        pos_set = np.asarray(positives[i]).ravel()
        if len(pos_set) == 0:
            continue
        pr = positive_ranks(ranks[i], pos_set, None if junk is None else junk[i])
        aps[i] = compute_ap(pr, len(pos_set))
        if len(pr):
            one_based = pr + 1
            for j, k in enumerate(kappas):
                kq = min(int(one_based.max()), int(k))
                prs[i, j] = np.sum(one_based <= kq) / kq
        else:
            prs[i, :] = 0.0
    valid = ~np.isnan(aps)
    out = {
        "mAP": float(100.0 * aps[valid].mean()) if valid.any() else float("nan"),
        "aps": aps,
        "num_evaluated": int(valid.sum()),
        "num_without_positive": int((~valid).sum()),
    }
    for j, k in enumerate(kappas):
        out[f"mP@{k}"] = float(100.0 * np.nanmean(prs[valid, j])) if valid.any() else float("nan")
    return out


def revisited_map(
    ranks: np.ndarray,
    easy: Sequence[np.ndarray],
    hard: Sequence[np.ndarray],
    junk: Sequence[np.ndarray],
    kappas: Sequence[int] = (1, 5, 10),
) -> dict[str, dict]:
    """Revisited Oxford/Paris Easy / Medium / Hard (revisitop ``evaluate``): E = easy vs
    junk+hard, M = easy+hard vs junk, H = hard vs junk+easy. Queries without positives skipped."""
    proto = {
        "E": ([np.asarray(e) for e in easy], [np.union1d(j, h) for j, h in zip(junk, hard)]),
        "M": ([np.union1d(e, h) for e, h in zip(easy, hard)], [np.asarray(j) for j in junk]),
        "H": ([np.asarray(h) for h in hard], [np.union1d(j, e) for j, e in zip(junk, easy)]),
    }
    return {name: mean_average_precision(ranks, pos, jk, kappas) for name, (pos, jk) in proto.items()}

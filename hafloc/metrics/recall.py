"""Recall@N over ranked database indices, and the ranking filters of the standard protocols."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def hit_matrix(ranks: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """(Nq, K) bool: ranks[i, j] is a positive of query i (padding -1 is never a hit)."""
    ranks = np.asarray(ranks)
    hits = np.zeros(ranks.shape, dtype=bool)
    for i, pos in enumerate(positives):
        if len(pos):
            hits[i] = np.isin(ranks[i], pos) & (ranks[i] >= 0)
    return hits


def first_hit(ranks: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """0-based rank of the first correct retrieval per query; -1 when none in the ranking."""
    hits = hit_matrix(ranks, positives)
    any_hit = hits.any(axis=1)
    return np.where(any_hit, hits.argmax(axis=1), -1)


def recall_at_n(ranks: np.ndarray, positives: Sequence[np.ndarray], ns: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """Percent of ALL queries with a positive among the top N (queries with no positive are misses)."""
    fh = first_hit(ranks, positives)
    nq = max(len(fh), 1)
    return {int(n): float(100.0 * np.sum((fh >= 0) & (fh < n)) / nq) for n in ns}


def recall_curve(ranks: np.ndarray, positives: Sequence[np.ndarray], max_n: int = 25) -> dict[str, list]:
    """Recall@N (percent) for N = 1..max_n, as {"n": [...], "recall": [...]}."""
    fh = first_hit(ranks, positives)
    nq = max(len(fh), 1)
    n = np.arange(1, max_n + 1)
    rec = [(float(100.0 * np.sum((fh >= 0) & (fh < k)) / nq)) for k in n]
    return {"n": n.tolist(), "recall": rec}


def panorama_nms(ranks: np.ndarray, pano_ids: np.ndarray, keep: int) -> np.ndarray:
    """Tokyo 24/7 spatial NMS: per query keep the first-ranked cutout of each panorama, in rank
    order, then the first ``keep`` of those. Returns (Nq, keep) padded with -1."""
    pano_ids = np.asarray(pano_ids)
    out = np.full((len(ranks), keep), -1, dtype=np.int64)
    for i, row in enumerate(np.asarray(ranks)):
        row = row[row >= 0]
        _, first = np.unique(pano_ids[row], return_index=True)
        kept = row[np.sort(first)][:keep]
        out[i, : len(kept)] = kept
    return out


def exclude_from_ranks(ranks: np.ndarray, excluded: np.ndarray, keep: int) -> np.ndarray:
    """Drop entries where ``excluded`` (Nq, K bool, aligned with ranks) is set; keep the first
    ``keep`` survivors per query, padded with -1."""
    out = np.full((len(ranks), keep), -1, dtype=np.int64)
    for i, (row, ex) in enumerate(zip(np.asarray(ranks), excluded)):
        kept = row[(~ex) & (row >= 0)][:keep]
        out[i, : len(kept)] = kept
    return out

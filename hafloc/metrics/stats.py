"""Statistics over runs and queries: the seeds' spread (``mean_std``) and the paired bootstrap
interval of a difference between two methods scored on the same queries (``paired_bootstrap``).

Per-query scores are whatever the protocol averages: 0/1 hits at recall@N (``hits_at`` from
first-hit ranks, e.g. ``EvalResult.query_first_hits()``) or per-query AP. Several seeds of one
method are pooled per query (the mean over its runs), so the query stays the resampling unit:
the interval covers the sampling of the test queries, with the seeds' noise averaged out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence, Union

import numpy as np

Scores = Union[Sequence[float], Sequence[Sequence[float]], np.ndarray]  # (Q,) or (runs, Q)

__all__ = ["BootstrapInterval", "MeanStd", "hits_at", "mean_std", "paired_bootstrap", "pool_runs"]


@dataclass(frozen=True)
class BootstrapInterval:
    """``mean_diff`` = mean(a - b) over queries; [``low``, ``high``] its percentile interval."""

    mean_diff: float
    low: float
    high: float
    ci: float
    n_queries: int
    n_boot: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def format(self, scale: float = 1.0, digits: int = 1) -> str:
        """'+4.2 [+0.8, +7.5]' (times ``scale``, e.g. 100 for hits -> percentage points)."""
        f = f"{{:+.{digits}f}}"
        return f"{f.format(self.mean_diff * scale)} [{f.format(self.low * scale)}, {f.format(self.high * scale)}]"


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (ddof=1; NaN for a single value) of ``n`` values."""

    mean: float
    std: float
    n: int

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": None if math.isnan(self.std) else self.std, "n": self.n}

    def format(self, digits: int = 1) -> str:
        """'61.2 ± 3.4' ('61.2' for one value, '-' for none)."""
        if self.n == 0:
            return "-"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def mean_std(values: Sequence[float] | np.ndarray) -> MeanStd:
    """The seeds' spread of one number (e.g. recall@1 of each seed's run)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return MeanStd(math.nan, math.nan, 0)
    std = float(v.std(ddof=1)) if v.size > 1 else math.nan
    return MeanStd(float(v.mean()), std, int(v.size))


def hits_at(first_hits: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """(Q,) 0/1 floats: the first right answer lies in the top ``n`` (first hit -1 or None: a miss)."""
    fh = np.asarray([-1 if h is None else h for h in first_hits], dtype=np.int64)
    return ((fh >= 0) & (fh < n)).astype(np.float64)


def pool_runs(scores: Scores) -> np.ndarray:
    """(Q,) per-query scores from a (Q,) array or a (runs, Q) stack (mean over the runs)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2:
        if s.shape[0] == 0:
            raise ValueError("no runs to pool")
        return s.mean(axis=0)
    if s.ndim != 1:
        raise ValueError(f"per-query scores must be (Q,) or (runs, Q), got shape {s.shape}")
    return s


def paired_bootstrap(a: Scores, b: Scores, n_boot: int = 10_000, seed: int = 0, ci: float = 0.95) -> BootstrapInterval:
    """Percentile bootstrap interval of mean(a - b), resampling queries with replacement.

    ``a`` and ``b`` are per-query scores of two methods on the same queries, in the same order:
    (Q,) or (runs, Q) (several seeds: pooled per query by ``pool_runs``; the two sides may have
    different numbers of runs). Deterministic for a ``seed``.
    """
    pa, pb = pool_runs(a), pool_runs(b)
    if pa.shape != pb.shape:
        raise ValueError(f"paired scores need the same queries: {pa.shape[0]} vs {pb.shape[0]}")
    if pa.size == 0:
        raise ValueError("no queries to bootstrap")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    d = pa - pb
    q = d.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 2_000_000 // q)  # bounded memory: at most ~16 MB of indices at a time
    for s in range(0, n_boot, chunk):
        k = min(chunk, n_boot - s)
        means[s : s + k] = d[rng.integers(0, q, size=(k, q))].mean(axis=1)
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return BootstrapInterval(float(d.mean()), float(low), float(high), float(ci), int(q), int(n_boot))

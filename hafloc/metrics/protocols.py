"""Score a Dataset from database and query descriptors with its published protocol."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from hafloc.datasets.base import Dataset
from hafloc.index.search import knn
from hafloc.metrics.ap import mean_average_precision, revisited_map
from hafloc.metrics.recall import exclude_from_ranks, panorama_nms, recall_at_n, recall_curve

CURVE_N = 25

# reorders ranked database indices (Nq, M) -> (Nq, M), e.g. re-ranking by verified local matches
Rerank = Callable[[np.ndarray], np.ndarray]


def _same_timestamp(ds: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    ts = ds.quirks.timestamps
    if ts is None:
        return None
    return np.asarray(ts["db"]).ravel(), np.asarray(ts["q"]).ravel()


def full_ranking(db_desc: np.ndarray, q_desc: np.ndarray) -> np.ndarray:
    """(Nq, Ndb) database indices, best first."""
    return knn(db_desc, q_desc, len(db_desc))[1].astype(np.int64)


def _score_recall(
    ds: Dataset, db_desc: np.ndarray, q_desc: np.ndarray, ns: Sequence[int], rerank: Rerank | None = None
) -> dict[str, Any]:
    k = max(max(ns), CURVE_N)
    positives = ds.query_positives()
    protocol = []
    if ds.positives is not None:
        protocol.append("explicit positive lists")
    elif ds.db_utm is not None:
        protocol.append(f"recall@N at {ds.pos_threshold:g} m (UTM radius)")
    else:
        protocol.append("recall@N by label")
    pano = ds.quirks.tokyo_nms
    ts = _same_timestamp(ds)
    k_get = k
    if pano is not None:
        pano_int = np.unique(np.asarray(pano), return_inverse=True)[1]
        k_get = k * int(np.bincount(pano_int).max())  # Tokyo: 12 cutouts per panorama -> 12*N
    if ts is not None:
        db_ts, q_ts = ts
        uniq, counts = np.unique(db_ts, return_counts=True)
        per_q = counts[np.searchsorted(uniq, q_ts).clip(0, len(uniq) - 1)] * np.isin(q_ts, uniq)
        k_get += int(per_q.max()) if len(per_q) else 0
    ranks = knn(db_desc, q_desc, min(k_get, len(db_desc)))[1].astype(np.int64)
    if rerank is not None:
        ranks = rerank(ranks)
    if ts is not None:
        ranks = exclude_from_ranks(ranks, db_ts[ranks] == q_ts[:, None], ranks.shape[1])
        positives = [p[db_ts[p] != q_ts[i]] for i, p in enumerate(positives)]
        protocol.append("database images with the query's timestamp excluded (TokyoTM)")
    if pano is not None:
        ranks = panorama_nms(ranks, pano_int, k)
        protocol.append("panorama NMS: retrieve 12*N, first cutout per panorama (Tokyo 24/7)")
    ranks = ranks[:, :k]
    out: dict[str, Any] = {f"recall@{n}": v for n, v in recall_at_n(ranks, positives, ns).items()}
    out["recall_curve"] = recall_curve(ranks, positives, CURVE_N)
    out["num_queries"] = ds.num_q
    out["num_queries_without_positive"] = int(sum(len(p) == 0 for p in positives))
    if ds.db_labels is not None and ds.positives is None and ds.db_utm is None:
        full = full_ranking(db_desc, q_desc)
        if rerank is not None:
            full = rerank(full)
        out["mAP"] = mean_average_precision(full, positives)["mAP"]
    if ds.quirks.protocol and ds.quirks.protocol not in protocol:
        protocol.insert(0, ds.quirks.protocol)
    out["protocol"] = "; ".join(protocol)
    out["_ranks"] = ranks
    return out


def score(
    ds: Dataset, db_desc: np.ndarray, q_desc: np.ndarray, ns: Sequence[int] = (1, 5, 10), rerank: Rerank | None = None
) -> dict[str, Any]:
    """Rank the database for every query (exact inner product on L2-normalised descriptors) and
    apply the dataset's protocol.

    Returns percent numbers: recall sets -> ``recall@N``, ``recall_curve`` {"n","recall"},
    ``num_queries``, ``num_queries_without_positive`` (counted as misses), and ``mAP`` for label
    sets; Oxford/Paris -> ``mAP``; revisited -> ``mAP`` (= Medium) and ``mAP_{E,M,H}``,
    ``mP@{1,5,10}_{E,M,H}``; Holidays -> ``mAP``. Always ``protocol`` (text) and ``_ranks``
    ((Nq, <=25) top database indices after the protocol's filtering, -1 padded; drop it before
    writing JSON). ``rerank`` reorders the ranking before the protocol filters it.
    """
    db_desc = np.asarray(db_desc, dtype=np.float32)
    q_desc = np.asarray(q_desc, dtype=np.float32)
    if db_desc.ndim != 2 or q_desc.ndim != 2 or db_desc.shape[1] != q_desc.shape[1]:
        raise ValueError(f"descriptor shapes do not match: db {db_desc.shape}, queries {q_desc.shape}")
    if len(db_desc) != ds.num_db or len(q_desc) != ds.num_q:
        raise ValueError(
            f"{ds.name}: got {len(db_desc)} db / {len(q_desc)} query descriptors for {ds.num_db} / {ds.num_q} images"
        )
    if ds.num_q == 0 or ds.num_db == 0:
        raise ValueError(f"{ds.name}: nothing to score ({ds.num_db} database, {ds.num_q} query images)")
    if ds.metric == "recall":
        return _score_recall(ds, db_desc, q_desc, ns, rerank)
    full = full_ranking(db_desc, q_desc)
    if rerank is not None:
        full = rerank(full)
    out: dict[str, Any] = {"num_queries": ds.num_q}
    if ds.metric == "revisited":
        rv = ds.quirks.revisited
        assert rv is not None  # Dataset refuses metric "revisited" without it
        res = revisited_map(full, rv["easy"], rv["hard"], rv["junk"], kappas=(1, 5, 10))
        for proto, r in res.items():
            out[f"mAP_{proto}"] = r["mAP"]
            for k in (1, 5, 10):
                out[f"mP@{k}_{proto}"] = r[f"mP@{k}"]
        out["mAP"] = out["mAP_M"]
        out["num_queries_without_positive"] = {p: r["num_without_positive"] for p, r in res.items()}
        out["protocol"] = "revisited Oxford/Paris E/M/H (revisitop mAP, mP@1/5/10; queries without positives skipped)"
    else:
        r = mean_average_precision(full, ds.query_positives(), ds.junk)
        out["mAP"] = r["mAP"]
        out["num_queries_without_positive"] = r["num_without_positive"]
        if ds.metric == "holidays":
            out["protocol"] = "INRIA Holidays mAP (query itself ignored)"
        else:
            crop = "crop" if ds.quirks.crop_queries else "full"
            out["protocol"] = f"Oxford/Paris mAP, junk removed ({crop} queries)"
    out["_ranks"] = full[:, :CURVE_N]
    return out


def jsonable(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` without the private ``_`` keys (ready for json.dump)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}

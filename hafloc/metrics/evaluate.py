"""Evaluate a model on a Dataset: extract (through a descriptor cache) and score by its protocol.

The cache is one ``.npz`` per (model fingerprint, extraction settings) in ``cache_dir``
(default ``$HAFLOC_CACHE`` or ``~/.cache/hafloc/descriptors``), mapping an image key (absolute
path, size, mtime, crop box) to its descriptor. A rerun with the same model and settings
extracts nothing; a changed file gets a new key. Written atomically, merged on every update.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np

from hafloc.datasets.base import Dataset
from hafloc.errors import HaflocError
from hafloc.fileio import atomic_path
from hafloc.metrics.protocols import score
from hafloc.metrics.recall import exclude_from_ranks, first_hit, recall_curve

if TYPE_CHECKING:
    from hafloc.metrics.verified import RerankSettings

log = logging.getLogger(__name__)

CACHE_ENV = "HAFLOC_CACHE"
_CACHE_OFF = ("", "0", "off", "none", "no")


def default_cache_dir() -> Path | None:
    """``$HAFLOC_CACHE`` (``off`` disables the cache) or ``~/.cache/hafloc/descriptors``."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in _CACHE_OFF else Path(env).expanduser()
    return Path.home() / ".cache" / "hafloc" / "descriptors"


def _cache_folder(cache_dir: str | Path | Literal[False] | None) -> Path | None:
    """The descriptor cache folder: ``cache_dir``, :func:`default_cache_dir` for None, none for False."""
    if cache_dir is None:
        return default_cache_dir()
    return None if cache_dir is False else Path(cache_dir)


@dataclass
class ExtractionSettings:
    """How images become descriptors; everything here except batch size/threads keys the cache."""

    batch_size: int = 8
    max_side: int | None = None
    backend: str = "torch"
    num_threads: int | None = None
    image_size: tuple[int, int] | None = None

    def extractor_for(self, model, ds: Dataset):
        """An Extractor that honours the dataset's loading quirks (Holidays: no EXIF, 1024x768)."""
        from hafloc.descriptors.extract import Extractor

        return Extractor(
            model,
            batch_size=self.batch_size,
            max_side=self.max_side,
            backend=self.backend,
            num_threads=self.num_threads,
            image_size=self.image_size,
            exif_transpose=bool(ds.quirks.apply_exif_orientation),
            max_size=ds.quirks.max_size,
        )


@dataclass
class DatasetDescriptors:
    """Descriptors of the images that loaded; ``db_ok``/``q_ok`` index into the dataset's lists."""

    db: np.ndarray
    q: np.ndarray
    db_ok: np.ndarray
    q_ok: np.ndarray
    failures: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason)
    extracted: int = 0  # descriptors computed in this call
    reused: int = 0  # descriptors taken from the cache
    seconds: float = 0.0
    cache_file: str | None = None

    def dataset(self, ds: Dataset) -> Dataset:
        """``ds`` restricted to the images that have descriptors (failed database images dropped)."""
        if len(self.db_ok) == ds.num_db and len(self.q_ok) == ds.num_q:
            return ds
        return ds.subset(db_idx=self.db_ok, q_idx=self.q_ok)


def settings_key(extractor) -> dict[str, Any]:
    """The extraction settings that change a descriptor (the cache file is keyed by them)."""
    return {
        "max_side": extractor.max_side,
        "image_size": list(extractor.image_size or []) or None,
        "exif_transpose": extractor.exif_transpose,
        "max_size": list(extractor.max_size) if extractor.max_size else None,
        "backend": extractor.backend,
    }


def image_key(path: Path, box: Sequence[float] | None = None) -> str:
    """Cache key of one image: absolute path + size + mtime (+ crop box)."""
    p = Path(path).resolve()
    try:
        st = p.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = "missing"
    key = f"{p}|{stamp}"
    if box is not None:
        key += "|crop=" + ",".join(f"{float(v):g}" for v in box)
    return key


class DescriptorCache:
    """names -> descriptors of one (model, settings) pair, persisted as one ``.npz``."""

    def __init__(self, cache_dir: Path, fingerprint: str, settings: dict[str, Any]):
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.path = Path(cache_dir) / f"{fingerprint}-{digest}.npz"
        self.fingerprint = fingerprint
        self.settings = settings
        self.entries: dict[str, np.ndarray] = self._read()

    def _read(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as z:
                if str(z["fingerprint"]) != self.fingerprint:
                    return {}
                return dict(zip(z["keys"].tolist(), np.asarray(z["descriptors"], dtype=np.float32)))
        except Exception as err:  # a damaged cache only costs a recomputation
            log.warning("ignoring unreadable descriptor cache %s (%s)", self.path, err)
            return {}

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        return {k: self.entries[k] for k in keys if k in self.entries}

    def update(self, new: dict[str, np.ndarray]) -> None:
        """Add ``new`` and rewrite the file (merged with what another process may have added)."""
        if not new:
            return
        merged = self._read()
        merged.update(self.entries)
        merged.update(new)
        self.entries = merged
        keys = list(merged)
        with atomic_path(self.path) as tmp:
            np.savez(
                tmp,
                fingerprint=self.fingerprint,
                settings=json.dumps(self.settings, sort_keys=True),
                keys=np.array(keys, dtype=str),
                descriptors=np.stack([merged[k] for k in keys]),
            )


def _extract_side(
    extractor,
    paths: list[Path],
    boxes: list | None,
    cache: DescriptorCache | None,
    memo: dict[str, np.ndarray],
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, list, int]:
    """One side (database or queries) -> (descriptors of the ok images, ok indices, failures, #extracted)."""
    keys = [image_key(p, None if boxes is None else boxes[i]) for i, p in enumerate(paths)]
    done = dict(memo)
    if cache is not None:
        done.update(cache.get(keys))
    todo = sum(k not in done for k in set(keys))
    crop = {i: tuple(b) for i, b in enumerate(boxes)} if boxes is not None else None
    resume = None if cache is None else cache.path.with_name(cache.path.stem + ".resume.npz")
    res = extractor.extract_paths(
        paths,
        names=keys,
        progress=progress and todo > 0,
        crop_boxes=crop,
        done=done,
        checkpoint=resume if todo else None,
    )
    got = dict(zip(res.names, res.descriptors))
    new = {k: v for k, v in got.items() if k not in done}
    memo.update(got)
    if cache is not None:
        cache.update(new)
        if resume is not None:
            resume.unlink(missing_ok=True)
    fail_reason = dict(res.failures)
    ok = np.array([i for i, k in enumerate(keys) if k in got], dtype=np.int64)
    dim = extractor.model.out_dim
    desc = np.stack([got[keys[i]] for i in ok]).astype(np.float32) if len(ok) else np.zeros((0, dim), np.float32)
    failures = [(str(paths[i]), fail_reason.get(k, "not extracted")) for i, k in enumerate(keys) if k not in got]
    return desc, ok, failures, len(new)


def _query_boxes(ds: Dataset, crop: bool) -> list | None:
    if not crop:
        return None
    if ds.quirks.crop_boxes is None:
        raise HaflocError(f"{ds.name}: crop queries asked for but the dataset has no query boxes")
    return [tuple(float(v) for v in b) for b in np.asarray(ds.quirks.crop_boxes)]


def extract_modes(
    model,
    ds: Dataset,
    settings: ExtractionSettings | None = None,
    *,
    crops: Sequence[bool] = (False,),
    cache_dir: str | Path | Literal[False] | None = None,
    progress: bool = True,
    extractor=None,
) -> list[DatasetDescriptors]:
    """Like :func:`extract_dataset` for several query modes (full / cropped) sharing one database pass.

    The first result carries the database extraction in its counts and time.
    """
    settings = settings or ExtractionSettings()
    extractor = extractor or settings.extractor_for(model, ds)
    folder = _cache_folder(cache_dir)
    cache = DescriptorCache(folder, model.fingerprint(), settings_key(extractor)) if folder is not None else None
    memo: dict[str, np.ndarray] = {}  # Holidays/Oxford queries are database images: extract them once
    t0 = time.perf_counter()
    db, db_ok, db_fail, n_db = _extract_side(extractor, ds.db_paths(), None, cache, memo, progress)
    out = []
    for k, crop in enumerate(crops):
        q, q_ok, q_fail, n_q = _extract_side(extractor, ds.q_paths(), _query_boxes(ds, crop), cache, memo, progress)
        n_new = n_q + (n_db if k == 0 else 0)
        n_all = len(q_ok) + (len(db_ok) if k == 0 else 0)
        out.append(
            DatasetDescriptors(
                db=db,
                q=q,
                db_ok=db_ok,
                q_ok=q_ok,
                failures=db_fail + q_fail,
                extracted=n_new,
                reused=n_all - n_new,
                seconds=time.perf_counter() - t0,
                cache_file=str(cache.path) if cache is not None else None,
            )
        )
        t0 = time.perf_counter()
    return out


def extract_dataset(
    model,
    ds: Dataset,
    settings: ExtractionSettings | None = None,
    *,
    crop_queries: bool | None = None,
    cache_dir: str | Path | Literal[False] | None = None,
    progress: bool = True,
    extractor=None,
) -> DatasetDescriptors:
    """Descriptors of a dataset's database and query images (cached; unreadable images skipped).

    ``crop_queries``: crop queries to ``quirks.crop_boxes`` (default: ``quirks.crop_queries``).
    ``cache_dir``: a folder, ``None`` for :func:`default_cache_dir`, ``False`` for no cache.
    ``extractor``: a ready :class:`~hafloc.descriptors.extract.Extractor` (else built from ``settings``).
    Use ``result.dataset(ds)`` for the dataset the descriptors belong to (failed images removed).
    """
    crop = bool(ds.quirks.crop_queries) if crop_queries is None else bool(crop_queries)
    return extract_modes(
        model, ds, settings, crops=(crop,), cache_dir=cache_dir, progress=progress, extractor=extractor
    )[0]


def _percent_keys(result: dict[str, Any]) -> list[str]:
    return [k for k in result if k.startswith(("recall@", "mAP", "mP@"))]  # global_* are already final


def _account_failed_queries(result: dict[str, Any], ds_db: Dataset, failed: np.ndarray, n_total: int) -> None:
    """Rescale the scores of the loaded queries so failed queries count as misses (AP 0)."""
    if len(failed) == 0:
        result["num_queries"] = n_total
        return
    n_ok = n_total - len(failed)
    fds = ds_db.subset(q_idx=failed)
    if ds_db.metric == "revisited":
        rv = fds.quirks.revisited
        assert rv is not None  # Dataset refuses metric "revisited" without it
        has = {
            "E": [len(e) > 0 for e in rv["easy"]],
            "M": [len(e) + len(h) > 0 for e, h in zip(rv["easy"], rv["hard"])],
            "H": [len(h) > 0 for h in rv["hard"]],
        }
        for proto, flags in has.items():
            nwp = result["num_queries_without_positive"][proto]
            evaluated = n_ok - nwp
            f_pos = int(sum(flags))
            factor = evaluated / max(evaluated + f_pos, 1)
            for k in _percent_keys(result):
                if k.endswith(f"_{proto}"):
                    result[k] *= factor
            result["num_queries_without_positive"][proto] = nwp + len(flags) - f_pos
        result["mAP"] = result["mAP_M"]
    else:
        pos = fds.query_positives()
        f_pos = sum(len(p) > 0 for p in pos)
        nwp = int(result.get("num_queries_without_positive", 0))
        map_factor = (n_ok - nwp) / max(n_ok - nwp + f_pos, 1)
        rec_factor = n_ok / n_total
        for k in _percent_keys(result):
            result[k] *= map_factor if k.startswith(("mAP", "mP@")) else rec_factor
        if "recall_curve" in result:
            result["recall_curve"]["recall"] = [r * rec_factor for r in result["recall_curve"]["recall"]]
        result["num_queries_without_positive"] = nwp + len(pos) - f_pos
    result["num_queries"] = n_total


def _recall_curve_for_map(ds: Dataset, result: dict[str, Any]) -> dict[str, list]:
    """Recall@N (any positive in the top N, junk removed) for mAP sets, so every set gets a curve."""
    ranks = result["_ranks"]
    if ds.junk is not None:
        ranks = exclude_from_ranks(ranks, np.stack([np.isin(r, j) for r, j in zip(ranks, ds.junk)]), ranks.shape[1])
    return recall_curve(ranks, ds.query_positives(), ranks.shape[1])


def score_descriptors(
    ds: Dataset,
    d: DatasetDescriptors,
    ns: Sequence[int] = (1, 5, 10),
    rerank: Callable[[Dataset, np.ndarray, np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """Score extracted descriptors: failed database images dropped, failed queries counted as misses.

    ``rerank(ds_ok, db_desc, q_desc)`` makes a ranking re-ranker for the dataset the descriptors
    belong to; the result is then the re-ranked one, with the global scores as ``global_<key>``
    and the re-ranker's ``summary()`` as ``rerank``.
    """
    if len(d.db_ok) == 0:
        raise HaflocError(f"{ds.name}: no database image could be read ({len(d.failures)} failures)")
    ds_db = ds.subset(db_idx=d.db_ok) if len(d.db_ok) != ds.num_db else ds
    failed_q = np.setdiff1d(np.arange(ds.num_q), d.q_ok)
    if len(d.q_ok) == 0:
        raise HaflocError(f"{ds.name}: no query image could be read ({len(failed_q)} failures)")
    ds_ok = ds_db.subset(q_idx=d.q_ok) if len(failed_q) else ds_db

    def scored(fn: Any = None) -> dict[str, Any]:
        r = score(ds_ok, d.db, d.q, ns=ns, rerank=fn)
        if "recall_curve" not in r and r.get("_ranks") is not None and ds_ok.metric != "revisited":
            r["recall_curve"] = _recall_curve_for_map(ds_ok, r)
        _account_failed_queries(r, ds_db, failed_q, ds.num_q)
        return r

    result = scored()
    if rerank is not None:
        fn = rerank(ds_ok, d.db, d.q)
        glob, result = result, scored(fn)
        for k in _percent_keys(glob):
            result[f"global_{k}"] = glob[k]
        result["global_recall_curve"] = glob.get("recall_curve")
        result["_global_ranks"] = glob.get("_ranks")
        result["rerank"] = fn.summary()
    result["num_queries_failed"] = int(len(failed_q))
    result["num_db_failed"] = int(ds.num_db - len(d.db_ok))
    result["_dataset"] = ds_ok  # what _ranks index into (database and query order)
    result["_q_index"] = d.q_ok  # row i of _ranks is query q_ok[i] of the original dataset
    return result


def evaluate(
    model,
    ds: Dataset,
    settings: ExtractionSettings | None = None,
    *,
    cache_dir: str | Path | Literal[False] | None = None,
    progress: bool = True,
    ns: Sequence[int] = (1, 5, 10),
    extractor=None,
    rerank: "RerankSettings | None" = None,
) -> EvalResult:
    """Extract and score ``ds`` with its protocol; percent numbers like :func:`protocols.score`.

    Oxford/Paris (original) are scored with full AND cropped queries: ``mAP_full``, ``mAP_crop``
    (``mAP`` = the dataset's own choice). The metrics add ``timing`` (seconds), ``cache``
    ({"extracted", "reused", "file"}), ``failures`` ([(path, reason)]), ``num_queries_failed``,
    ``num_db_failed``, ``descriptor_dim``, ``fingerprint`` and ``dataset`` (summary); the ranks,
    the scored subset and the query rows are the :class:`EvalResult`'s fields.
    ``rerank``: re-rank each query's top K by verified local matches (``hafloc.metrics.verified``);
    the scores are then the re-ranked ones and ``global_<key>`` the global-only ones.
    """
    if ds.num_q == 0 or ds.num_db == 0:
        raise HaflocError(f"{ds.name}: nothing to evaluate ({ds.num_db} database, {ds.num_q} query images)")
    if not ds.has_ground_truth():
        raise HaflocError(f"{ds.name}: no ground truth (positions, labels or positive lists) to score against")
    settings = settings or ExtractionSettings()
    extractor = extractor or settings.extractor_for(model, ds)
    t0 = time.perf_counter()
    both = ds.metric == "map" and ds.quirks.crop_boxes is not None
    primary = bool(ds.quirks.crop_queries)
    crops = (primary, not primary) if both else (primary,)
    parts = extract_modes(model, ds, settings, crops=crops, cache_dir=cache_dir, progress=progress, extractor=extractor)
    t_scoring = time.perf_counter()
    folder = _cache_folder(cache_dir)
    scored = [
        score_descriptors(
            dataclasses.replace(ds, quirks=dataclasses.replace(ds.quirks, crop_queries=c)),
            d,
            ns,
            None if rerank is None else _reranker_factory(rerank, extractor, c, folder, progress),
        )
        for c, d in zip(crops, parts)
    ]
    scoring = time.perf_counter() - t_scoring
    result = scored[0]
    failures: list[tuple[str, str]] = []
    for d in parts:
        failures += [f for f in d.failures if f not in failures]
    if both:
        for c, r in zip(crops, scored):
            result["mAP_crop" if c else "mAP_full"] = r["mAP"]
        result["protocol"] = (
            f"Oxford/Paris mAP, junk removed (full and crop queries; mAP = {'crop' if primary else 'full'})"
        )
    extracted = sum(d.extracted for d in parts)
    reused = sum(d.reused for d in parts)
    ex_seconds = sum(d.seconds for d in parts)
    d = parts[0]
    n_images = ds.num_db + ds.num_q * (2 if both else 1)
    result.update(
        {
            "fingerprint": model.fingerprint(),
            "descriptor_dim": int(model.out_dim),
            "dataset": ds.summary(),
            "failures": [list(f) for f in failures],
            "cache": {"extracted": int(extracted), "reused": int(reused), "file": d.cache_file},
            "timing": {
                "extract_s": round(ex_seconds, 3),
                "score_s": round(scoring, 3),
                "total_s": round(time.perf_counter() - t0, 3),
                "images_per_s": round(extracted / ex_seconds, 2) if extracted and ex_seconds > 0 else None,
                "num_images": n_images,
            },
        }
    )
    return EvalResult(
        metrics={k: v for k, v in result.items() if not k.startswith("_")},
        ranks=result["_ranks"],
        dataset=result["_dataset"],
        q_index=result["_q_index"],
        global_ranks=result.get("_global_ranks"),
    )


@dataclass(eq=False)
class EvalResult(Mapping[str, Any]):
    """One evaluation. ``metrics``: the public, JSON-ready numbers and notes (percent scores by
    protocol key, ``global_<key>`` before re-ranking, ``protocol``, ``timing``, ``cache``,
    ``failures``, ``dataset`` summary, ...); reading the result as a mapping reads them.
    ``ranks``: per scored query, database indices into ``dataset`` (the scored subset: failed
    images removed), best first; ``global_ranks``: the same before re-ranking (None without);
    ``q_index``: row i of ``ranks`` is query ``q_index[i]`` of the dataset evaluated.
    """

    metrics: dict[str, Any]
    ranks: np.ndarray
    dataset: Dataset
    q_index: np.ndarray
    global_ranks: np.ndarray | None = None

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    @property
    def protocol(self) -> str:
        return str(self.metrics.get("protocol", ""))

    @property
    def timing(self) -> dict[str, Any]:
        return dict(self.metrics.get("timing", {}))

    def to_json(self) -> dict[str, Any]:
        """The metrics as a plain dict (``json.dump`` ready)."""
        return {k: v for k, v in self.metrics.items() if not k.startswith("_")}

    def query_first_hits(self, num_queries: int | None = None) -> np.ndarray:
        """(Q,) 0-based rank of each query's first right answer, for every query of the dataset
        evaluated (``num_queries``, default: the metrics' ``num_queries``), -1 for a miss or a failed query;
        the per-query scores of ``hafloc.metrics.stats`` (``hits_at``)."""
        n = int(num_queries if num_queries is not None else self.metrics.get("num_queries", len(self.q_index)))
        out = np.full(n, -1, dtype=np.int64)
        out[np.asarray(self.q_index, dtype=np.int64)] = first_hit(self.ranks, self.dataset.query_positives())
        return out


def _reranker_factory(rerank: "RerankSettings", extractor, crop: bool, cache_folder: Path | None, progress: bool):
    """Builds the ranking re-ranker of one query mode once the scored subset is known."""
    from hafloc.index.rerank import Reranker
    from hafloc.local.cache import LocalFeatureCache
    from hafloc.metrics.verified import RankReranker

    reranker = Reranker(rerank.extractor, rerank.conf, rule=rerank.rule)
    cache = LocalFeatureCache(cache_folder, rerank.extractor, reranker.extractor.conf) if cache_folder else None

    def make(ds_ok: Dataset, db_desc: np.ndarray, q_desc: np.ndarray) -> RankReranker:
        boxes = _query_boxes(ds_ok, crop)
        return RankReranker(
            rerank,
            reranker,
            ds_ok.db_paths(),
            ds_ok.q_paths(),
            db_desc,
            q_desc,
            load=extractor.load,
            key=image_key,
            cache=cache,
            q_boxes=boxes,
            progress=progress,
        )

    return make


def headline(result: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers a results table shows for one evaluation (percent), by protocol."""
    keys: list[str] = [
        k
        for k in ("recall@1", "recall@5", "recall@10", "mAP_full", "mAP_crop", "mAP_E", "mAP_M", "mAP_H")
        if k in result
    ]
    if "mAP" in result and not any(k.startswith("mAP_") for k in keys):
        keys.append("mAP")
    return {k: result[k] for k in keys}

"""Calibrated confidence: P(the estimate lies within ``agree_m`` of the truth), fitted per index.

Labels come from leave-one-out over the database itself: each positioned image (or a random
subset of ``max_samples``) is located against all the *other* images, with its neighbours closer
than ``exclude_m`` hidden too (near-duplicate video frames would otherwise make every answer look
right); the label is whether that estimate falls within ``agree_m`` of the image's own position.
Per-query features (``FEATURES``, version ``FEATURES_VERSION``):

* ``best_similarity``: cosine similarity of the best positioned match;
* ``margin``: that minus the best similarity of a positioned match farther than ``agree_m`` from
  it (when no retrieved match is farther, the lowest retrieved similarity: a lower bound);
* ``agreement``: ``Estimate.agreement`` (share of the vote mass that agrees with the anchor);
* ``log_agreeing``: ``log(1 + n_agreeing)``;
* ``log_inliers``: ``log(1 + inliers)`` of the anchor, only when re-ranking set ``Match.inliers``.

Inliers are handled by a *separate model*: the calibrator holds a ``base`` model (the four
features) and, when the leave-one-out matches carried inliers, an ``inliers`` model (all five).
A query whose anchor has no inlier count uses ``base``, so a missing count never reads as zero.

Each model is a logistic regression on standardised features whose coefficients are all >= 0
(a feature that comes out negative is dropped and the rest refitted): more similarity, margin,
agreement or inliers never lowers the confidence. Optionally an isotonic (monotone) map of the
logistic score follows; the variant with the lower out-of-fold ECE (stratified 5-fold) is kept.
The result is JSON (``calibration.json`` in the index folder, written atomically), never pickle.

Small indexes borrow strength: an index of the shipped default model (as shipped or adapted to its
photos) at the prior's radius and depth, global or re-ranked by xfeat, fits its models as MAP
logistic regressions whose Gaussian priors are centred on that pipeline's entry of ``PRIOR_FILE``
(fitted by scripts/fit_calibration_prior.py on leave-one-out answers of the street sets' train
splits) and weigh ``PRIOR_STRENGTH`` answers:
a few dozen photos move the prior a little, thousands override it, and the curve stays smooth
(no isotonic steps below ``MIN_ISOTONIC_WITH_PRIOR`` answers).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import numpy as np
from tqdm import tqdm

from hafloc.datasets.geo import EARTH_RADIUS_M, haversine_m
from hafloc.errors import HaflocError, InputError
from hafloc.fileio import write_json_atomic
from hafloc.index.calibration_model import (
    PRIOR_STRENGTH,
    _fit_logistic,
    _Model,
    expected_calibration_error,
    fit_model,
)
from hafloc.index.locate import Estimate, estimate_position, fallback_confidence, unrelated_gate
from hafloc.index.store import IndexStore, Match

CALIBRATION_FILE = "calibration.json"
FORMAT = "hafloc-calibration"
FEATURES_VERSION = 1
FEATURES = ("best_similarity", "margin", "agreement", "log_agreeing")
INLIER_FEATURE = "log_inliers"
DEFAULT_AGREE_M = 25.0
# Hides frames a few seconds apart in a walking video (and GPS-jitter copies of one shot) while
# keeping genuine other views of a place, which lie 5-25 m away, as positives.
DEFAULT_EXCLUDE_M = 5.0
DEFAULT_K = 10
MIN_POSITIONED = 50  # ``index build`` calibrates automatically from this many positioned images
MIN_SAMPLES = 50  # fewer leave-one-out answers: refused unless forced (``min_samples=0``)

PRIOR_FILE = Path(__file__).resolve().parents[1] / "descriptors" / "default" / "calibration-prior.json"
PRIOR_FORMAT = "hafloc-calibration-prior"

# rerank(query_row, matches) -> matches re-ordered / with inliers set; query_row indexes store.descriptors()
Rerank = Callable[[int, list[Match]], list[Match]]


# -- features ----------------------------------------------------------------------------------


def query_features(matches: Sequence[Match], estimate: Estimate | None, agree_m: float) -> dict[str, float] | None:
    """The calibration features of one located query (None when there is no estimate)."""
    if estimate is None:
        return None
    positioned = [m for m in matches if m.positioned]
    if not positioned:
        return None
    best = max(positioned, key=lambda m: m.similarity)
    far = [m.similarity for m in positioned if haversine_m(best.lat, best.lon, m.lat, m.lon) > agree_m]
    other = max(far) if far else min(m.similarity for m in matches)
    feats = {
        "best_similarity": float(best.similarity),
        "margin": float(best.similarity - other),
        "agreement": float(estimate.agreement),
        "log_agreeing": math.log1p(estimate.n_agreeing),
    }
    inliers = getattr(best, "inliers", None)
    if inliers is not None:
        feats[INLIER_FEATURE] = math.log1p(max(0, int(inliers)))
    return feats


@dataclass
class Calibrator:
    """The fitted calibration of one index; ``probability`` maps a query's features to P(right)."""

    base: _Model
    inliers: _Model | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def agree_m(self) -> float:
        return float(self.meta.get("agree_m", DEFAULT_AGREE_M))

    @property
    def k(self) -> int:
        return int(self.meta.get("k", DEFAULT_K))

    def probability(self, feats: dict[str, float] | None) -> float:
        """P(within ``agree_m``); 0 without an estimate. Uses the inliers model only when the count is known;
        scaled by ``unrelated_gate`` when the calibration measured the index's unrelated similarity."""
        if feats is None:
            return 0.0
        model = self.inliers if (self.inliers is not None and INLIER_FEATURE in feats) else self.base
        p = float(model.predict(np.array([[feats[f] for f in model.features]]))[0])
        return p * unrelated_gate(feats["best_similarity"], self.meta.get("unrelated_similarity"))

    def confidence(self, matches: Sequence[Match], estimate: Estimate | None) -> float:
        return self.probability(query_features(matches, estimate, self.agree_m))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "features_version": FEATURES_VERSION,
            **self.meta,
            "base": self.base.to_json(),
            "inliers": None if self.inliers is None else self.inliers.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Calibrator":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError("not a hafloc calibration")
        if d.get("features_version") != FEATURES_VERSION:
            raise ValueError(f"features version {d.get('features_version')}, this hafloc uses {FEATURES_VERSION}")
        meta = {k: v for k, v in d.items() if k not in ("format", "base", "inliers")}
        return cls(
            base=_Model.from_json(d["base"]),
            inliers=None if d.get("inliers") is None else _Model.from_json(d["inliers"]),
            meta=meta,
        )


def calibration_path(index: str | Path) -> Path:
    return Path(index) / CALIBRATION_FILE


def load_calibrator(store: IndexStore) -> Calibrator | None:
    """The index's calibrator; None when there is none or it belongs to another model.

    A damaged file raises ``InputError`` naming it (rerun ``hafloc index calibrate``).
    """
    path = calibration_path(store.folder)
    if not path.is_file():
        return None
    try:
        cal = Calibrator.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(path, f"unusable calibration ({err}); rerun 'hafloc index calibrate'") from None
    if cal.meta.get("model_fingerprint") not in (None, store.fingerprint):
        return None
    return cal


# -- unrelated photos ----------------------------------------------------------------------------


def probe_images() -> list[Any]:
    """Frames that show no place: uniform noise (3 seeds), flat black, dark grey, grey, light grey and
    white (640x480 RGB). What they match on an index, and how well, is what an unrelated photo gets."""
    from PIL import Image

    rng = np.random.default_rng(20211)
    noise = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(3)]
    return noise + [Image.new("RGB", (640, 480), (v, v, v)) for v in (0, 64, 128, 192, 255)]


def describe_probes(extractor: Any) -> np.ndarray:
    """(P, D) descriptors of ``probe_images`` by ``extractor`` (an ``Extractor`` of the index's model)."""
    return np.stack([extractor.describe_image(img)["descriptor"] for img in probe_images()])


def unrelated_similarity(store: IndexStore, probe_descriptors: np.ndarray) -> float | None:
    """The best similarity to a positioned image that any probe (``probe_images``, described by the
    index's model) reaches on ``store``: photos matching no better are unrelated to the index."""
    if len(probe_descriptors) == 0:
        return None
    q = np.ascontiguousarray(store.project(np.asarray(probe_descriptors, np.float32)), np.float32)
    found = cast(list[list[Match]], store.search(q, DEFAULT_K))
    sims = [m.similarity for ms in found for m in ms if m.positioned]
    return float(max(sims)) if sims else None


# -- leave-one-out -----------------------------------------------------------------------------


@dataclass
class LooSamples:
    """Leave-one-out results: per sampled image its row, features and label."""

    rows: list[int]
    features: list[dict[str, float]]
    labels: np.ndarray  # 1 = estimate within agree_m of the image's position
    heuristic: np.ndarray  # the uncalibrated confidence locate would report (``fallback_confidence``)
    no_estimate: int = 0  # sampled images whose remaining matches had no position (label 0, not fitted)


def _unit_xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=1)


def leave_one_out(
    store: IndexStore,
    agree_m: float = DEFAULT_AGREE_M,
    exclude_m: float = DEFAULT_EXCLUDE_M,
    k: int = DEFAULT_K,
    max_samples: int | None = 5000,
    seed: int = 0,
    rerank: Rerank | None = None,
    progress: bool = True,
    descriptors: tuple[np.ndarray, list[str], np.ndarray] | None = None,
    unrelated: float | None = None,
) -> LooSamples:
    """Locate each (sampled) positioned database image against the others, hiding itself and its
    neighbours closer than ``exclude_m`` metres. Batched searches of the stored descriptors in the
    index's own search structure (as ``locate`` searches); ``rerank`` may reorder / annotate each
    image's matches first. ``unrelated``: the index's unrelated similarity, which gates the
    uncalibrated confidence recorded beside each answer (as ``locate`` reports it)."""
    from scipy.spatial import cKDTree

    if agree_m <= 0 or exclude_m < 0 or k < 1:
        raise HaflocError(f"need agree_m > 0, exclude_m >= 0 and k >= 1 (got {agree_m}, {exclude_m}, {k})")
    ids, _names, desc = descriptors if descriptors is not None else store.descriptors()
    by_id = {int(r["id"]): r for r in store.images()}
    keep = np.array([int(i) in by_id for i in ids], bool)  # a row removed meanwhile by another writer
    if not keep.all():
        ids, desc = ids[keep], desc[keep]
    meta = [by_id[int(i)] for i in ids]
    lat = np.array([np.nan if r["lat"] is None else r["lat"] for r in meta], np.float64)
    lon = np.array([np.nan if r["lon"] is None else r["lon"] for r in meta], np.float64)
    pos_rows = np.flatnonzero(~np.isnan(lat))
    if len(pos_rows) == 0:
        raise HaflocError(f"{store.folder}: no positioned images to calibrate on")
    rng = np.random.default_rng(seed)
    sample = (
        pos_rows
        if max_samples is None or len(pos_rows) <= max_samples
        else np.sort(rng.choice(pos_rows, max_samples, replace=False))
    )
    # neighbours within exclude_m (chord length on the unit sphere ~ arc for such small distances)
    xyz = _unit_xyz(lat[pos_rows], lon[pos_rows])
    hidden: list[set[int]] = [set() for _ in sample]
    if exclude_m > 0:
        tree = cKDTree(xyz)
        r = 2 * math.sin(exclude_m / (2 * EARTH_RADIUS_M))
        for j, near in enumerate(tree.query_ball_point(_unit_xyz(lat[sample], lon[sample]), r)):
            cand = pos_rows[near]
            d = [haversine_m(lat[sample[j]], lon[sample[j]], lat[c], lon[c]) for c in cand]
            hidden[j] = {int(c) for c, dd in zip(cand, d) if dd < exclude_m}
    for j, qi in enumerate(sample):
        hidden[j].add(int(qi))

    out = LooSamples(rows=[], features=[], labels=np.zeros(0), heuristic=np.zeros(0))
    labels, heur = [], []
    batch = 256
    bar = tqdm(total=len(sample), desc="calibrating", unit="img", disable=not progress)
    for s in range(0, len(sample), batch):
        part = sample[s : s + batch]
        depth = min(len(desc), k + max(len(h) for h in hidden[s : s + batch]))
        # the index's own search structure: what `locate` will use (exact for flat indexes)
        found = cast(list[list[Match]], store.search(np.ascontiguousarray(desc[part], np.float32), depth))
        for j, qi in enumerate(part):
            hide = {int(ids[r]) for r in hidden[s + j]}
            ms = [m for m in found[j] if m.id not in hide][:k]
            if rerank is not None:
                ms = list(rerank(int(qi), ms))
            est = estimate_position(ms, agree_m)
            feats = query_features(ms, est, agree_m)
            if est is None or feats is None:
                out.no_estimate += 1
                continue
            out.rows.append(int(qi))
            out.features.append(feats)
            labels.append(int(haversine_m(est.lat, est.lon, lat[qi], lon[qi]) <= agree_m))
            heur.append(fallback_confidence(est, unrelated))
        bar.update(len(part))
    bar.close()
    out.labels, out.heuristic = np.array(labels, int), np.array(heur, np.float64)
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Prior:
    """The shipped calibration prior of one pipeline (global, or re-ranked with its inliers model)."""

    base: _Model
    inliers: _Model | None
    meta: dict[str, Any]


def fit_calibrator(samples: LooSamples, seed: int = 0, prior: Prior | None = None) -> tuple[Calibrator, dict[str, Any]]:
    """Fit the base model and, when every sample has an inlier count, the inliers model; each shrunk
    towards ``prior``'s model of the same features when it has one."""
    names = list(FEATURES)
    x = np.array([[f[n] for n in names] for f in samples.features], np.float64).reshape(-1, len(names))
    base, rep = fit_model(x, samples.labels, names, seed=seed, prior=None if prior is None else prior.base)
    inl = None
    with_inl = [i for i, f in enumerate(samples.features) if INLIER_FEATURE in f]
    if with_inl and len(with_inl) == len(samples.features):
        names5 = names + [INLIER_FEATURE]
        x5 = np.array([[samples.features[i][n] for n in names5] for i in with_inl], np.float64)
        inl, rep5 = fit_model(
            x5, samples.labels[with_inl], names5, seed=seed, prior=None if prior is None else prior.inliers
        )
        rep["inliers_ece_heldout"] = rep5["ece_heldout"]
    return Calibrator(base=base, inliers=inl), rep


def fit_prior(samples: Sequence[LooSamples], seed: int = 0) -> dict[str, Any]:
    """One pipeline's prior from pooled leave-one-out answers: plain logistic regressions (no isotonic
    map: a prior is a centre to shrink coefficients towards) of the base features and, when every
    answer has inliers, of those plus inliers; with their out-of-fold ECE. The prior file's entry."""
    names = list(FEATURES)
    feats = [f for s in samples for f in s.features]
    y = np.concatenate([s.labels for s in samples]).astype(int)
    out: dict[str, Any] = {"n_samples": int(len(y)), "positives_rate": round(float(y.mean()), 4)}
    for key, cols in (("base", names), ("inliers", names + [INLIER_FEATURE])):
        if key == "inliers" and not all(INLIER_FEATURE in f for f in feats):
            out["inliers"] = None
            continue
        x = np.array([[f[n] for n in cols] for f in feats], np.float64).reshape(-1, len(cols))
        _, rep = fit_model(x, y, cols, seed=seed)
        out[f"{key}_ece_heldout"] = rep["ece_heldout_by_method"]["logistic"]
        out[key] = _fit_logistic(x, y, cols).to_json()
    return out


def load_prior(reranked: bool = False, path: Path = PRIOR_FILE) -> Prior | None:
    """The shipped calibration prior of the global (or re-ranked) pipeline; None when absent or made
    for another default model than the one installed (it would be stale)."""
    from hafloc.descriptors.modelfile import DEFAULT_SHA256

    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise InputError(path, f"unusable calibration prior ({err}); reinstall hafloc") from None
    if not isinstance(d, dict) or d.get("format") != PRIOR_FORMAT or d.get("features_version") != FEATURES_VERSION:
        raise InputError(path, "not a hafloc calibration prior of this version; reinstall hafloc")
    entry = d.get("reranked" if reranked else "global")
    if d.get("model_sha256") != DEFAULT_SHA256 or not entry:
        return None
    meta = {k: v for k, v in d.items() if k not in ("global", "reranked")}
    meta.update(
        {k: v for k, v in entry.items() if k not in ("base", "inliers")}, pipeline="reranked" if reranked else "global"
    )
    inliers = entry.get("inliers")
    return Prior(_Model.from_json(entry["base"]), None if inliers is None else _Model.from_json(inliers), meta)


def index_uses_default_model(store: IndexStore) -> bool:
    """The index was built with the shipped default model, as shipped or adapted to its photos."""
    from hafloc.descriptors.modelfile import DEFAULT, read_model_file
    from hafloc.index.adapt import ADAPTED_NAME

    recorded = store.info.get("model_path")
    if recorded == DEFAULT:
        return True
    adapted = store.folder / ADAPTED_NAME  # an adapted model travels inside its index folder
    if not recorded or Path(recorded).name != ADAPTED_NAME or not adapted.is_file():
        return False
    try:
        meta = read_model_file(adapted).get("meta") or {}
    except HaflocError:
        return False
    return (meta.get("adapted") or {}).get("from") == DEFAULT


def prior_for(store: IndexStore, agree_m: float, k: int, reranked: bool) -> Prior | None:
    """The shipped prior when it applies to this calibration: the index's model is the default, at
    the prior's radius and depth, for its pipeline (global, or re-ranked by the index's local
    features as the default pipeline re-ranks: xfeat)."""
    if not index_uses_default_model(store):
        return None
    if reranked and (store.local_config or {}).get("extractor") != "xfeat":
        return None
    prior = load_prior(reranked)
    if prior is None:
        return None
    if float(prior.meta.get("agree_m", -1)) != float(agree_m) or int(prior.meta.get("k", -1)) != int(k):
        return None
    return prior


def _check_enough(store: IndexStore, n: int, what: str, min_samples: int) -> None:
    if n < min_samples:
        raise HaflocError(
            f"{store.folder}: only {n} {what}, {min_samples} needed for a calibration worth trusting; without "
            "one, locate reports the uncalibrated confidence (a heuristic: unrelated photos score low, but it is "
            "no probability); --force fits anyway"
        )


class CalibrationNotKept(HaflocError):
    """The fitted calibration is no better than the uncalibrated confidence (held-out ECE)."""


def calibrate_index(
    store: IndexStore,
    agree_m: float = DEFAULT_AGREE_M,
    exclude_m: float | None = None,
    k: int = DEFAULT_K,
    max_samples: int | None = 5000,
    seed: int = 0,
    rerank: Rerank | None = None,
    progress: bool = True,
    write: bool = True,
    min_samples: int = MIN_SAMPLES,
    probes: np.ndarray | None = None,
) -> Calibrator:
    """Leave-one-out over ``store``, fit, and (``write``) store ``calibration.json`` in the index folder.

    Fewer than ``min_samples`` leave-one-out answers: a ``HaflocError`` saying what the user gets
    instead (0 forces the fit). With ``write``, the calibration is kept only when its held-out ECE
    beats the uncalibrated confidence's on the same answers; otherwise ``CalibrationNotKept`` (an
    earlier ``calibration.json`` is removed: locate then reports the uncalibrated confidence).
    ``probes``: the model's descriptors of ``probe_images``; their best similarity becomes the
    ``unrelated_gate``'s floor, applied to the held-out predictions too (the ECE is the gated one's).

    ``exclude_m`` None (auto): ``DEFAULT_EXCLUDE_M``, and 0 when that leaves too few right answers
    (photos of a place sharing one position, as label datasets have). ``rerank(query_row, matches)
    -> matches`` is applied to every image's matches before the estimate, as ``locate`` would
    re-rank a query (set ``Match.inliers`` there to fit the inliers model).
    """
    tries = [DEFAULT_EXCLUDE_M, 0.0] if exclude_m is None else [float(exclude_m)]
    prior = prior_for(store, agree_m, k, rerank is not None)
    descriptors = store.descriptors()
    _check_enough(store, int(store.info.get("counts", {}).get("positioned", 0)), "positioned photos", min_samples)
    floor = unrelated_similarity(store, probes) if probes is not None else None
    for i, ex_m in enumerate(tries):
        samples = leave_one_out(store, agree_m, ex_m, k, max_samples, seed, rerank, progress, descriptors, floor)
        _check_enough(store, len(samples.labels), "leave-one-out answers", min_samples)
        try:
            cal, rep = fit_calibrator(samples, seed, prior=prior)
            break
        except HaflocError as err:
            if i + 1 < len(tries):
                continue
            hint = (
                f"; a right answer needs another photo of the place within {agree_m:g} m and at least "
                f"{ex_m:g} m away (--exclude-m 0 when photos of a place share one position)"
                if samples.labels.mean() < 0.5 and ex_m > 0
                else ""
            )
            raise HaflocError(f"{store.folder}: {err}{hint}") from None
    exclude_m = ex_m
    y = samples.labels
    best = np.array([f["best_similarity"] for f in samples.features], np.float64)
    heldout = rep["heldout_predictions"] * np.array([unrelated_gate(s, floor) for s in best])
    cal.meta = {
        "features": list(FEATURES),
        "agree_m": float(agree_m),
        "exclude_m": float(exclude_m),
        "k": int(k),
        "n_samples": int(len(y)),
        "positives_rate": round(float(y.mean()), 4),
        "no_estimate": samples.no_estimate,
        "method": rep["method"],
        "ece_heldout": round(expected_calibration_error(heldout, y), 4),
        "ece_heldout_by_method": rep["ece_heldout_by_method"],
        "folds": rep["folds"],
        "ece_heuristic": round(expected_calibration_error(samples.heuristic, y), 4),
        "exclude_auto": len(tries) > 1,
        "prior": None
        if prior is None
        else {
            "file": PRIOR_FILE.name,
            "pipeline": prior.meta["pipeline"],
            "strength": PRIOR_STRENGTH,
            "n_samples": prior.meta.get("n_samples"),
        },
        "reranked": rerank is not None,
        "model_fingerprint": store.fingerprint,
        "unrelated_similarity": None if floor is None else round(floor, 4),
        "index_images": len(store),
        "created_at": _now(),
        # per-sample held-out probability and label: what `index info --report` plots
        "heldout": {
            "p": [round(float(v), 4) for v in heldout],
            "y": [int(v) for v in y],
            "heuristic": [round(float(v), 4) for v in samples.heuristic],
        },
    }
    if "inliers_ece_heldout" in rep:
        cal.meta["inliers_ece_heldout"] = rep["inliers_ece_heldout"]
    if write and not cal.meta["ece_heldout"] < cal.meta["ece_heuristic"]:
        old = calibration_path(store.folder)
        removed = old.is_file()
        old.unlink(missing_ok=True)
        raise CalibrationNotKept(
            f"{store.folder}: calibration not kept: its held-out ECE {cal.meta['ece_heldout']:.3f} does not beat "
            f"the uncalibrated confidence's {cal.meta['ece_heuristic']:.3f} on the same {len(y)} answers; locate "
            "reports the uncalibrated confidence" + (" (the earlier calibration.json was removed)" if removed else "")
        )
    if write:
        write_json_atomic(calibration_path(store.folder), cal.to_json())
    return cal


def summary_line(cal: Calibrator) -> str:
    m = cal.meta
    hidden = f"neighbours within {m['exclude_m']:g} m hidden" if m["exclude_m"] > 0 else "only the photo hidden"
    if m.get("exclude_auto") and m["exclude_m"] == 0:
        hidden += f" (hiding {DEFAULT_EXCLUDE_M:g} m left too few right answers)"
    prior = " and the default model's prior" if m.get("prior") else ""
    return (
        f"calibrated on {m['n_samples']} leave-one-out answers{prior} ({100 * m['positives_rate']:.0f} % within "
        f"{m['agree_m']:g} m, {hidden}): held-out ECE {m['ece_heldout']:.3f} "
        f"({m['method']}; uncalibrated {m['ece_heuristic']:.3f})"
    )

"""The calibration's statistics and models: ECE and reliability, and the monotone logistic (or
isotonic-on-logistic) regressions ``hafloc.index.calibrate`` fits, optionally shrunk towards a prior
(MAP with a Gaussian prior worth ``PRIOR_STRENGTH`` answers)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from hafloc.errors import HaflocError

ECE_BINS = 10
MIN_PER_CLASS = 5
PRIOR_STRENGTH = 50.0  # the prior counts as this many leave-one-out answers
MIN_ISOTONIC_WITH_PRIOR = 200


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with ``bins`` equal-width bins: sum over bins of (share of samples) x |accuracy - mean p|."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    if len(p) == 0:
        return float("nan")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(y[sel].mean() - p[sel].mean())
    return float(ece)


def reliability_bins(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty bin: mean confidence, accuracy, count (the reliability diagram's data)."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            out.append(
                {
                    "lo": b / bins,
                    "hi": (b + 1) / bins,
                    "confidence": float(p[sel].mean()),
                    "accuracy": float(y[sel].mean()),
                    "count": int(sel.sum()),
                }
            )
    return out


def coverage_curve(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, accuracy): answering only the most confident fraction of queries."""
    order = np.argsort(-np.asarray(p, np.float64), kind="stable")
    ys = np.asarray(y, np.float64)[order]
    n = np.arange(1, len(ys) + 1)
    return n / len(ys), np.cumsum(ys) / n


def accuracy_at_coverage(p: np.ndarray, y: np.ndarray, coverage: float) -> float:
    """Accuracy of the ``coverage`` most confident share of the queries."""
    if len(p) == 0:
        return float("nan")
    cov, acc = coverage_curve(p, y)
    i = max(0, int(math.ceil(coverage * len(cov))) - 1)
    return float(acc[i])


# -- the model ---------------------------------------------------------------------------------


@dataclass
class _Model:
    """Logistic regression on standardised features, optionally followed by an isotonic map."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    iso_x: list[float] | None = None
    iso_y: list[float] | None = None

    def score(self, x: np.ndarray) -> np.ndarray:
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return z @ np.asarray(self.coef) + self.intercept

    def predict(self, x: np.ndarray) -> np.ndarray:
        s = self.score(np.atleast_2d(np.asarray(x, np.float64)))
        if self.iso_x is not None and self.iso_y is not None:
            return np.clip(np.interp(s, self.iso_x, self.iso_y), 0.0, 1.0)
        return 1.0 / (1.0 + np.exp(-s))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "method": "isotonic" if self.iso_x is not None else "logistic",
            "features": self.features,
            "mean": self.mean,
            "scale": self.scale,
            "coef": self.coef,
            "intercept": self.intercept,
        }
        if self.iso_x is not None:
            d.update(iso_x=self.iso_x, iso_y=self.iso_y)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "_Model":
        m = cls(
            features=[str(f) for f in d["features"]],
            mean=[float(v) for v in d["mean"]],
            scale=[float(v) for v in d["scale"]],
            coef=[float(v) for v in d["coef"]],
            intercept=float(d["intercept"]),
            iso_x=[float(v) for v in d["iso_x"]] if d.get("iso_x") is not None else None,
            iso_y=[float(v) for v in d["iso_y"]] if d.get("iso_y") is not None else None,
        )
        if not (len(m.features) == len(m.mean) == len(m.scale) == len(m.coef)) or min(m.scale, default=1) <= 0:
            raise ValueError("inconsistent model arrays")
        return m


def _fit_logistic(x: np.ndarray, y: np.ndarray, names: Sequence[str]) -> _Model:
    """Non-negative-coefficient logistic regression: drop features that come out negative."""
    from sklearn.linear_model import LogisticRegression

    keep = list(range(x.shape[1]))
    while True:
        xs = x[:, keep]
        mean, scale = xs.mean(0), xs.std(0)
        scale = np.where(scale > 1e-9, scale, 1.0)
        lr = LogisticRegression(C=1.0, max_iter=1000).fit((xs - mean) / scale, y)
        coef = lr.coef_[0]
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep = [k for k, c in zip(keep, coef) if c >= 0] or [keep[int(np.argmax(coef))]]
    return _Model(
        features=[names[k] for k in keep],
        mean=mean.tolist(),
        scale=scale.tolist(),
        coef=np.maximum(coef, 0.0).tolist(),
        intercept=float(lr.intercept_[0]),
    )


def _fit_shrunk(x: np.ndarray, y: np.ndarray, names: Sequence[str], prior: _Model, strength: float) -> _Model:
    """MAP logistic regression in ``prior``'s features and standardisation, with a Gaussian prior
    centred on its coefficients and intercept worth ``strength`` answers; coefficients kept >= 0."""
    from scipy.optimize import minimize
    from scipy.special import expit

    z = (_select(x, names, prior.features) - np.asarray(prior.mean)) / np.asarray(prior.scale)
    z1 = np.hstack([z, np.ones((len(z), 1))])
    theta0 = np.array([*prior.coef, prior.intercept], np.float64)
    lam = strength / 4.0  # one answer carries at most p(1 - p) = 1/4 of information per unit

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        s = z1 @ theta
        d = theta - theta0
        grad = z1.T @ (expit(s) - y) + lam * d
        return float(np.sum(np.logaddexp(0.0, s) - y * s) + 0.5 * lam * d @ d), grad

    bounds = [(0.0, None)] * len(prior.coef) + [(None, None)]
    theta = minimize(loss, theta0, jac=True, method="L-BFGS-B", bounds=bounds).x
    return _Model(
        features=list(prior.features),
        mean=list(prior.mean),
        scale=list(prior.scale),
        coef=[float(c) for c in theta[:-1]],
        intercept=float(theta[-1]),
    )


def _add_isotonic(model: _Model, x: np.ndarray, y: np.ndarray, names: Sequence[str]) -> _Model:
    from sklearn.isotonic import IsotonicRegression

    s = model.score(_select(x, names, model.features))
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(s, y)
    return _Model(**{**model.__dict__, "iso_x": iso.X_thresholds_.tolist(), "iso_y": iso.y_thresholds_.tolist()})


def _select(x: np.ndarray, names: Sequence[str], wanted: Sequence[str]) -> np.ndarray:
    return x[:, [list(names).index(f) for f in wanted]]


def fit_model(
    x: np.ndarray, y: np.ndarray, names: Sequence[str], folds: int = 5, seed: int = 0, prior: _Model | None = None
) -> tuple[_Model, dict[str, Any]]:
    """Logistic or isotonic-on-logistic, whichever has the lower out-of-fold ECE; refitted on all.
    With a ``prior`` the logistic part is shrunk towards it (``_fit_shrunk``): one class alone is
    then enough, and isotonic is tried only from ``MIN_ISOTONIC_WITH_PRIOR`` answers."""
    from sklearn.model_selection import KFold, StratifiedKFold

    x, y = np.asarray(x, np.float64), np.asarray(y, int)
    n_pos = int(y.sum())
    fewest = min(n_pos, len(y) - n_pos)
    if (fewest < MIN_PER_CLASS and prior is None) or len(y) < 2:
        raise HaflocError(
            f"cannot calibrate: {n_pos} right and {len(y) - n_pos} wrong leave-one-out answers; "
            f"need at least {MIN_PER_CLASS} of each"
        )

    def fit(xx: np.ndarray, yy: np.ndarray) -> _Model:
        return _fit_logistic(xx, yy, names) if prior is None else _fit_shrunk(xx, yy, names, prior, PRIOR_STRENGTH)

    try_isotonic = prior is None or len(y) >= MIN_ISOTONIC_WITH_PRIOR
    if fewest >= 2:
        folds = min(folds, fewest)
        splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y)
    else:  # a single class (only the prior's fit can take it): plain folds
        folds = min(folds, len(y))
        splits = KFold(folds, shuffle=True, random_state=seed).split(x)
    oof = {"logistic": np.zeros(len(y)), "isotonic": np.zeros(len(y))}
    for train, test in splits:
        lm = fit(x[train], y[train])
        oof["logistic"][test] = lm.predict(_select(x[test], names, lm.features))
        if try_isotonic:
            im = _add_isotonic(lm, x[train], y[train], names)
            oof["isotonic"][test] = im.predict(_select(x[test], names, im.features))
    ece = {k: expected_calibration_error(v, y) for k, v in oof.items() if try_isotonic or k == "logistic"}
    # isotonic must earn its steps: keep the smooth logistic unless isotonic is clearly better
    method = "isotonic" if try_isotonic and ece["isotonic"] < ece["logistic"] - 0.005 else "logistic"
    model = fit(x, y)
    if method == "isotonic":
        model = _add_isotonic(model, x, y, names)
    return model, {
        "method": method,
        "ece_heldout": round(ece[method], 4),
        "ece_heldout_by_method": {k: round(v, 4) for k, v in ece.items()},
        "folds": folds,
        "heldout_predictions": oof[method],
    }

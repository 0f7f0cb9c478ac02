"""The confidence calibration report: reliability diagram, ECE, accuracy/coverage curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from hafloc.errors import InputError
from hafloc.index.calibration_model import (
    accuracy_at_coverage,
    coverage_curve,
    expected_calibration_error,
    reliability_bins,
)
from hafloc.reports.html import ReportImage, Section, Table, write_report
from hafloc.reports.plots import _save  # also selects the headless Agg backend

# isort: split
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def _check(p: ArrayLike, y: ArrayLike, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    p_arr, y_arr = np.asarray(p, np.float64), np.asarray(y, np.float64)
    if len(p_arr) == 0 or p_arr.shape != y_arr.shape:
        raise InputError(path, "need equally many (>0) probabilities and labels")
    return p_arr, y_arr


def _finish(fig, ax, path: str | Path, xlabel: str, ylabel: str, ymax: float, legend: str, title: str) -> Path:
    """The axes both plots share (unit square, grid, legend, title), then save."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, ymax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, linestyle="--", alpha=0.5)
    ax.legend(loc=legend, fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_reliability(curves: Mapping[str, tuple[ArrayLike, ArrayLike]], path: str | Path, title: str = "") -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, one line per curve."""
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    for name, (p, y) in curves.items():
        p_arr, y_arr = _check(p, y, path)
        bins = reliability_bins(p_arr, y_arr)
        ece = expected_calibration_error(p_arr, y_arr)
        ax.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            marker="o",
            label=f"{name} (ECE {ece:.3f}, n={len(p_arr)})",
        )
    return _finish(fig, ax, path, "confidence", "share of estimates within the radius", 1.0, "upper left", title)


def plot_coverage(curves: Mapping[str, tuple[ArrayLike, ArrayLike]], path: str | Path, title: str = "") -> Path:
    """Accuracy of the answers kept when only the most confident share of queries is answered."""
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for name, (p, y) in curves.items():
        cov, acc = coverage_curve(*_check(p, y, path))
        ax.plot(cov, acc, label=name)
    return _finish(
        fig,
        ax,
        path,
        "coverage (share of queries answered, most confident first)",
        "accuracy of the answered",
        1.02,
        "lower left",
        title,
    )


def write_calibration_report(
    meta: Mapping[str, Any] | None, out_dir: str | Path, title: str, summary: Sequence[str] = ()
) -> Path:
    """``out_dir/index.html``: the index's ``summary`` lines, then both plots from a calibration's
    ``meta`` (held-out predictions); ``meta`` None (an uncalibrated index): the summary and a note."""
    out = Path(out_dir)
    head = [Section("Index", pre="\n".join(summary))] if summary else []
    if meta is None:
        note = Section(
            "Calibration",
            paragraphs=[
                "Not calibrated: confidences are the uncalibrated heuristic. 'hafloc index calibrate' fits the "
                "calibration (leave-one-out over the index's positioned photos); this page then shows its "
                "reliability diagram and accuracy/coverage curve."
            ],
        )
        return write_report(out, title, [*head, note], footer="hafloc index info --report")
    held = meta.get("heldout") or {}
    p, y = np.asarray(held.get("p", []), np.float64), np.asarray(held.get("y", []), np.float64)
    if len(p) == 0:
        raise InputError(out, "the calibration holds no held-out predictions to plot")
    curves = {"calibrated (held-out folds)": (p, y)}
    if len(held.get("heuristic", [])) == len(p):
        curves["uncalibrated heuristic"] = (np.asarray(held["heuristic"], np.float64), y)
    plot_reliability(curves, out / "reliability.png", "Reliability")
    plot_coverage(curves, out / "coverage.png", "Accuracy vs coverage")
    rows = [{"coverage": f"{c:.0%}", "accuracy": accuracy_at_coverage(p, y, c)} for c in (1.0, 0.9, 0.5, 0.2)]
    facts = [
        f"P(estimate within {meta.get('agree_m', 25):g} m) fitted on {meta.get('n_samples')} leave-one-out "
        f"answers over the index ({100 * float(meta.get('positives_rate', 0)):.0f} % right), neighbours closer "
        f"than {meta.get('exclude_m', 0):g} m hidden; model: {meta.get('method')} on "
        f"{', '.join(meta.get('features', []))}.",
        f"Held-out ECE {float(meta.get('ece_heldout', float('nan'))):.3f} (the uncalibrated heuristic: "
        f"{float(meta.get('ece_heuristic', float('nan'))):.3f}). Fitted {meta.get('created_at', '?')}.",
    ]
    bins = [
        {
            "bin": f"{b['lo']:.1f}-{b['hi']:.1f}",
            "mean confidence": b["confidence"],
            "accuracy": b["accuracy"],
            "n": b["count"],
        }
        for b in reliability_bins(p, y)
    ]
    sections = [
        Section(
            "Calibration",
            paragraphs=facts,
            tables=[Table(rows, ["coverage", "accuracy"], caption="accuracy of the most confident answers")],
            images=[
                ReportImage("reliability.png", "reliability diagram (held-out folds)"),
                ReportImage("coverage.png", "accuracy vs coverage"),
            ],
        ),
        Section("Reliability bins", tables=[Table(bins, ["bin", "mean confidence", "accuracy", "n"])]),
    ]
    return write_report(out, title, [*head, *sections], footer="hafloc index info --report")

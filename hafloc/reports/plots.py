"""Matplotlib figures for results: recall curves, training history, retrievals, attention, weights.

Every function renders with the Agg backend (no display needed), writes its PNG atomically and
returns the final path; bad input raises ``InputError`` and leaves no file behind.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: never touch a display, even when one exists

import matplotlib.cm  # noqa: E402
import matplotlib.colors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402
from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: E402

from hafloc.errors import InputError  # noqa: E402
from hafloc.fileio import atomic_path  # noqa: E402

_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h"]
_LINESTYLES = ["-", "--", "-.", ":"]  # 4 and 11 markers: no two of the first 44 curves look alike
_LEVEL_ORDER = ["low", "mid", "high"]
_DPI = 110


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG through a temp file; close it whatever happens."""
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight", facecolor="white")
    finally:
        plt.close(fig)
    return path


def _open_rgb(image: str | Path | Image.Image) -> Image.Image:
    """RGB image with EXIF orientation applied; ``InputError`` for unreadable files."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise InputError(image, "file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(image, f"cannot read image ({type(e).__name__}: {e})") from e


def _thumb(im: Image.Image, side: int = 320) -> Image.Image:
    im = im.copy()
    im.thumbnail((side, side))
    return im


def coinciding_curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> dict[str, str]:
    """Curves that lie exactly on an earlier one: ``{name: the first curve with the same points}``.

    ``series[name] = (x, y)``. Such a curve hides the one below it, so a reader would count one
    method too few; the plots say so in the legend and callers can say it in a caption.
    """
    out: dict[str, str] = {}
    seen: list[tuple[str, np.ndarray]] = []
    for name, (x, y) in series.items():
        pts = np.array([np.asarray(x, dtype=float), np.asarray(y, dtype=float)]) if len(x) == len(y) else None
        if pts is None:
            continue
        first = next(
            (n for n, q in seen if q.shape == pts.shape and np.allclose(q, pts, rtol=0, atol=1e-9, equal_nan=True)),
            None,
        )
        if first is None:
            seen.append((name, pts))
        else:
            out[name] = first
    return out


def _draw_curves(ax, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], markersize: float, **kw) -> None:
    """One line per series, each with its own marker and dash pattern; a curve lying on earlier
    ones gets hollow markers, larger with each (all stay visible), and "(same as X)" in the legend."""
    same = coinciding_curves(series)
    layer: dict[str, int] = {}
    for i, (name, (x, y)) in enumerate(series.items()):
        style: dict[str, Any] = {"marker": _MARKERS[i % len(_MARKERS)], "linestyle": _LINESTYLES[i % len(_LINESTYLES)]}
        if name in same:
            layer[same[name]] = layer.get(same[name], 0) + 1
            style.update(markerfacecolor="none", markeredgewidth=1.5, markersize=markersize + 3 * layer[same[name]])
        label = f"{name} (same as {same[name]})" if name in same else name
        ax.plot(x, y, label=label, **{"markersize": markersize, **kw, **style})


def plot_recall_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    title: str = "",
    threshold_m: float | None = 25,
) -> Path:
    """Recall@N curves, one per method (the paper's Fig. 3 style).

    ``curves[method] = {"n": [1, 2, ...], "recall": [%, ...]}``; recall in percent.
    """
    if not curves:
        raise InputError(path, "no recall curves to plot")
    for name, c in curves.items():
        n, r = list(c.get("n", [])), list(c.get("recall", []))
        if not n or len(n) != len(r):
            raise InputError(path, f"curve {name!r}: 'n' and 'recall' must be non-empty and of equal length")
        if not all(math.isfinite(float(v)) for v in r):
            raise InputError(path, f"curve {name!r}: recall values must be finite")
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    series = {name: ([float(v) for v in c["n"]], [float(v) for v in c["recall"]]) for name, c in curves.items()}
    lo = min(min(r) for _, r in series.values())
    max_n = max(1, *(int(max(n)) for n, _ in series.values()))
    _draw_curves(ax, series, markersize=5, linewidth=1.6)
    ax.set_xlabel("N - Number of top database candidates")
    ax.set_ylabel("Recall@N (%)")
    ax.set_xlim(0, max_n + 1)
    ax.set_ylim(max(0.0, math.floor(lo / 10.0) * 10.0 - 5.0), 100.5)
    ax.grid(True, linestyle="--", alpha=0.6)
    ax.legend(loc="lower right")
    full_title = title
    if threshold_m is not None:
        full_title = f"{title} (threshold {threshold_m:g} m)" if title else f"threshold {threshold_m:g} m"
    if full_title:
        ax.set_title(full_title)
    return _save(fig, path)


def _read_history(history_csv: Path) -> dict[str, list[float]]:
    try:
        with open(history_csv, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "epoch" not in reader.fieldnames:
                raise InputError(history_csv, "history CSV has no 'epoch' column")
            cols: dict[str, list[float]] = {k: [] for k in reader.fieldnames}
            for lineno, row in enumerate(reader, start=2):
                for k in reader.fieldnames:
                    v = row.get(k)
                    try:
                        cols[k].append(float(v) if v not in (None, "") else math.nan)
                    except ValueError:
                        raise InputError(history_csv, f"line {lineno}: column {k!r} is not a number ({v!r})") from None
    except FileNotFoundError as e:
        raise InputError(history_csv, "file not found") from e
    except UnicodeDecodeError as e:
        raise InputError(history_csv, f"not a text CSV ({e})") from e
    if not cols["epoch"]:
        raise InputError(history_csv, "history CSV has no rows")
    return cols


def _recall_columns(names: Sequence[str]) -> list[tuple[str, str]]:
    """Columns holding validation recall (e.g. ``val_recall@5``, ``recall@1``) with short labels."""
    out = []
    for k in names:
        low = k.lower()
        if "recall" in low or low.startswith("r@"):
            label = k.replace("val_", "").replace("valid_", "")
            out.append((k, label))
    return out


def plot_history(history_csv: str | Path, path: str | Path) -> Path:
    """Training history: loss per epoch and, when present, validation recall@N per epoch."""
    history_csv = Path(history_csv)
    cols = _read_history(history_csv)
    epochs = cols["epoch"]
    loss_cols = [k for k in cols if "loss" in k.lower()]
    recall_cols = _recall_columns(list(cols))
    if not loss_cols and not recall_cols:
        raise InputError(history_csv, "history CSV has neither a loss nor a recall column")
    panels = int(bool(loss_cols)) + int(bool(recall_cols))
    fig, axes = plt.subplots(1, panels, figsize=(5.6 * panels, 4.2), squeeze=False)
    ax_iter = iter(axes[0])
    if loss_cols:
        ax = next(ax_iter)
        _draw_curves(ax, {k: (epochs, cols[k]) for k in loss_cols}, markersize=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title("Training loss")
        ax.grid(True, linestyle="--", alpha=0.6)
        ax.legend(loc="upper right")
    if recall_cols:
        ax = next(ax_iter)
        _draw_curves(ax, {label: (epochs, cols[k]) for k, label in recall_cols}, markersize=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("Recall@N (%)")
        ax.set_title("Validation recall")
        ax.grid(True, linestyle="--", alpha=0.6)
        ax.legend(loc="lower right")
    for ax in axes[0]:
        if len(epochs) <= 20:
            ax.set_xticks(sorted({int(e) for e in epochs if math.isfinite(e)}))
    fig.tight_layout()
    return _save(fig, path)


def _frame(ax, color: str, width: float = 5.0) -> None:
    for side in ax.spines.values():
        side.set_visible(True)
        side.set_edgecolor(color)
        side.set_linewidth(width)


def plot_retrievals(
    query: str | Path | Image.Image,
    retrieved: Sequence[str | Path | Image.Image],
    correct: Sequence[bool],
    path: str | Path,
    titles: Sequence[str] | None = None,
) -> Path:
    """Query and its top-k database images in a row; green frame = right match, red = wrong."""
    if len(retrieved) != len(correct):
        raise InputError(path, f"{len(retrieved)} retrieved images but {len(correct)} correctness flags")
    if titles is not None and len(titles) != len(retrieved) + 1:
        raise InputError(path, f"titles must have {len(retrieved) + 1} entries (query + each retrieval)")
    # same height for every panel, widths by aspect ratio, so the row reads as one strip
    images = [_open_rgb(query)] + [_open_rgb(p) for p in retrieved]
    height = 240
    images = [
        im.resize((max(1, round(im.width * height / im.height)), height), Image.Resampling.BILINEAR) for im in images
    ]
    ratios = [im.width / im.height for im in images]
    n = len(images)
    fig, axes = plt.subplots(
        1, n, figsize=(2.5 * sum(ratios) + 0.2 * n, 2.9), squeeze=False, gridspec_kw={"width_ratios": ratios}
    )
    for i, (ax, im) in enumerate(zip(axes[0], images)):
        ax.imshow(im)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            t = titles[i]
        elif i == 0:
            t = "query"
        else:
            t = f"#{i} " + ("\u2713" if correct[i - 1] else "\u2717")
        if i == 0:
            _frame(ax, "#1f4e9c", 3.0)
            ax.set_title(t, fontsize=12, fontweight="bold")
        else:
            ok = bool(correct[i - 1])
            _frame(ax, "#1a9c3c" if ok else "#d62728")
            ax.set_title(t, fontsize=12, color="#1a7f32" if ok else "#c21f1f")
    fig.tight_layout()
    return _save(fig, path)


def _overlay_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Normalise an attention map to [0, 1] and resize it bilinearly to ``size`` = (w, h)."""
    m = np.asarray(m, dtype=np.float32)
    m = np.squeeze(m)
    if m.ndim != 2:
        raise ValueError(f"attention map must be (h, w), got shape {np.shape(m)}")
    if not np.isfinite(m).all():
        raise ValueError("attention map has non-finite values")
    lo, hi = float(m.min()), float(m.max())
    m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    up = Image.fromarray(m, mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(up), 0.0, 1.0)


def plot_attention(
    image: str | Path | Image.Image,
    maps: Mapping[str, np.ndarray],
    path: str | Path,
    strides: Mapping[str, int] | None = None,
    alpha: float = 0.5,
) -> Path:
    """The image, then per level (low/mid/high) its attention map upsampled and overlaid as a heat map.

    Each map is min-max normalised on its own, since levels differ in scale; ``strides`` (by level)
    adds "(stride 8)" etc. to the panel titles.
    """
    if not maps:
        raise InputError(path, "no attention maps to plot")
    im = _open_rgb(image)
    im = _thumb(im, 640)
    order = [k for k in _LEVEL_ORDER if k in maps] + [k for k in maps if k not in _LEVEL_ORDER]
    overlays = []
    for level in order:
        try:
            overlays.append(_overlay_map(maps[level], im.size))
        except ValueError as e:
            raise InputError(path, f"level {level!r}: {e}") from e
    n = 1 + len(order)
    aspect = im.size[1] / im.size[0]
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2 * aspect + 0.6), squeeze=False)
    axes = axes[0]
    axes[0].imshow(im)
    axes[0].set_title("image", fontsize=10)
    rgb = np.asarray(im)
    for ax, level, ov in zip(axes[1:], order, overlays):
        ax.imshow(rgb)
        ax.imshow(ov, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
        t = level
        if strides and level in strides:
            t = f"{level} (stride {strides[level]})"
        shape = np.squeeze(np.asarray(maps[level])).shape
        ax.set_title(f"{t}\n{shape[0]}\u00d7{shape[1]} map", fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    if overlays:
        # an opaque mappable so the colour bar shows the true colours, not the faded overlay
        sm = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0.0, 1.0), cmap="jet")
        cb = fig.colorbar(sm, ax=list(axes[1:]), fraction=0.025, pad=0.01)
        cb.set_label("attention (normalised per level)", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    return _save(fig, path)


def _fmt_cell(v: object) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.2f}"
    return str(v)


def plot_weights_table(
    rows: Sequence[Mapping[str, object]],
    path: str | Path,
    columns: Sequence[str] = ("dataset", "w1", "w2", "w3", "recall@5"),
    title: str = "Fusion weights per benchmark",
) -> Path:
    """The paper's Table 2 style: per benchmark, the tuned weights w1..w3 and the recall@5 reached."""
    if not rows:
        raise InputError(path, "no rows for the weights table")
    for i, r in enumerate(rows):
        missing = [c for c in columns if c not in r]
        if missing:
            raise InputError(path, f"row {i} lacks column(s) {', '.join(missing)}")
    headers = [
        {"w1": "w1 (low)", "w2": "w2 (mid)", "w3": "w3 (high)", "recall@5": "Recall@5 (%)"}.get(c, c) for c in columns
    ]
    cells = [[_fmt_cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(h), *(len(r[j]) for r in cells)) + 4 for j, h in enumerate(headers)]
    fig, ax = plt.subplots(figsize=(0.11 * sum(widths) + 0.4, 0.36 * (len(rows) + 1) + 0.1))
    ax.axis("off")
    # bbox fills the axes, so the figure size alone sets the row height (no stray margins)
    table = ax.table(
        cellText=cells,
        colLabels=headers,
        cellLoc="center",
        bbox=Bbox.from_bounds(0, 0, 1, 1),
        colWidths=[w / sum(widths) for w in widths],
    )
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    for (row, _col), cell in table.get_celld().items():
        cell.set_edgecolor("#888888")
        if row == 0:
            cell.set_facecolor("#e8edf5")
            cell.set_text_props(fontweight="bold")
        elif row % 2 == 0:
            cell.set_facecolor("#f7f7f7")
    if title:
        ax.set_title(title, fontsize=11, pad=6)
    return _save(fig, path)


def plot_seed_spread(
    panels: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, metric: str = "recall@1 (%)", title: str = ""
) -> Path:
    """One panel per group (e.g. dataset): per configuration, each seed's value as a dot and the
    mean +- sample std as a dash with whiskers. ``panels[group][config] = [value per seed]``."""
    groups = {g: {c: [float(v) for v in vals] for c, vals in cfgs.items() if len(vals)} for g, cfgs in panels.items()}
    groups = {g: c for g, c in groups.items() if c}
    if not groups:
        raise InputError(path, "no values to plot")
    for g, cfgs in groups.items():
        for c, vals in cfgs.items():
            if not all(math.isfinite(v) for v in vals):
                raise InputError(path, f"{g}/{c}: values must be finite")
    widest = max(len(c) for c in groups.values())
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(6.0, 0.75 * widest + 2), 3.2 * len(groups)), squeeze=False)
    for ax, (group, cfgs) in zip(axes[:, 0], groups.items()):
        names = list(cfgs)
        x = np.arange(len(names))
        means = np.array([np.mean(cfgs[n]) for n in names])
        stds = np.array([np.std(cfgs[n], ddof=1) if len(cfgs[n]) > 1 else 0.0 for n in names])
        # no bars: the axis does not start at 0, and a bar's length would overstate the gaps
        ax.errorbar(
            x,
            means,
            yerr=stds,
            fmt="_",
            markersize=22,
            mew=2.5,
            color="#1f3b57",
            ecolor="#1f3b57",
            capsize=5,
            zorder=3,
            label="mean ± std",
        )
        for i, n in enumerate(names):
            vals = cfgs[n]
            jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(1)
            ax.scatter(i + jitter, vals, s=16, color="#d1495b", zorder=4)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylabel(metric)
        lo = min(min(v) for v in cfgs.values())
        hi = max(max(v) for v in cfgs.values())
        ax.set_ylim(max(0.0, lo - 0.15 * max(hi - lo, 5.0) - 5.0), min(100.0, hi + 0.15 * max(hi - lo, 5.0) + 2.0))
        ax.set_title(group, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    # a band of its own for the title: tight_layout alone runs the first panel's title into it
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()) if title else None)
    return _save(fig, path)

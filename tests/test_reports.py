"""Report layer: PNG plots, Markdown/HTML tables, the HTML report, and its rendering in Chromium."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hafloc.errors import InputError
from hafloc.reports import (
    ReportImage,
    Section,
    Table,
    coinciding_curves,
    html_table,
    markdown_table,
    plot_attention,
    plot_history,
    plot_recall_curves,
    plot_retrievals,
    plot_seed_spread,
    plot_weights_table,
    render_report,
    write_report,
)

try:
    from browser import browser_available, images_loaded, open_page, screenshot
except ImportError:  # tests/ turned into a package
    from tests.browser import browser_available, images_loaded, open_page, screenshot


@pytest.fixture
def landmark_images(request) -> list[Path]:
    """Real photos from ../shared/data/landmarks_mini; uses conftest's ``shared_data`` when it exists."""
    try:
        root = Path(request.getfixturevalue("shared_data"))
    except pytest.FixtureLookupError:  # conftest not providing it (yet): same lookup rule, locally
        root = Path(
            os.environ.get("HAFLOC_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
        )
        if not root.is_dir():
            pytest.skip(f"real test data not found at {root} (set HAFLOC_SHARED_DATA)")
    images = sorted((root / "landmarks_mini" / "images").glob("*.jpg"))
    if len(images) < 6:
        pytest.skip(f"landmarks_mini images missing under {root}")
    return images


def _png(path: Path) -> Image.Image:
    """Open and fully decode a PNG (raises on a truncated/invalid file)."""
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.convert("RGB")


def _count_color(im: Image.Image, rgb: tuple[int, int, int], tol: int = 12) -> int:
    a = np.asarray(im).astype(int)
    return int((np.abs(a - np.array(rgb)).max(axis=2) <= tol).sum())


def _no_partials(folder: Path) -> bool:
    return not any(".partial" in p.name for p in folder.iterdir())


CURVES = {
    "NetVLAD": {"n": list(range(1, 26)), "recall": [60 + k for k in range(25)]},
    "HAF": {"n": list(range(1, 26)), "recall": [70 + k for k in range(25)]},
}


def test_recall_curves_png(tmp_path: Path) -> None:
    out = plot_recall_curves(CURVES, tmp_path / "sub" / "recall.png", title="Pitts30k")
    assert out == tmp_path / "sub" / "recall.png"
    im = _png(out)
    assert 500 <= im.width <= 1200 and 400 <= im.height <= 900
    # both default-cycle colours (tab:blue, tab:orange) are drawn: one curve per method
    assert _count_color(im, (31, 119, 180)) > 200
    assert _count_color(im, (255, 127, 14)) > 200
    assert _count_color(im, (44, 160, 44)) == 0  # no third curve
    assert _no_partials(out.parent)


def test_coinciding_curves_stay_visible_and_are_named(tmp_path: Path) -> None:
    """Two methods with the same recall at every N: the helper names the later one, and in the
    figure the lower curve still shows (the upper one dashed, with larger hollow markers)."""
    same = {"NetVLAD": CURVES["NetVLAD"], "HAF": CURVES["HAF"], "GeM": CURVES["NetVLAD"]}
    assert coinciding_curves({k: (c["n"], c["recall"]) for k, c in same.items()}) == {"GeM": "NetVLAD"}
    # history columns: NaN (no loss before training) equals NaN; a different length never coincides
    nan = float("nan")
    assert coinciding_curves({"a": ([0, 1], [nan, 2.0]), "b": ([0, 1], [nan, 2.0]), "c": ([0], [nan])}) == {"b": "a"}
    blue = (31, 119, 180)  # the first curve's colour, drawn first, under the second
    alone = _count_color(_png(plot_recall_curves({"NetVLAD": CURVES["NetVLAD"]}, tmp_path / "one.png")), blue)
    both = {"NetVLAD": CURVES["NetVLAD"], "GeM": CURVES["NetVLAD"]}
    im = _png(plot_recall_curves(both, tmp_path / "two.png"))
    # drawn as before (solid, same filled markers) only the legend's sample stayed blue: about 5 %
    assert _count_color(im, blue) > 0.3 * alone
    assert _count_color(im, (255, 127, 14)) > 200


def test_plot_failure_leaves_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = plot_recall_curves(CURVES, tmp_path / "recall.png")
    before = path.read_bytes()
    with pytest.raises(InputError, match="recall.png"):
        plot_recall_curves({"bad": {"n": [1, 2], "recall": [50.0]}}, path)
    # a failure inside savefig itself (mathtext parse error at draw time)
    with pytest.raises(ValueError):
        plot_recall_curves(CURVES, path, title=r"$\frac{$")
    assert path.read_bytes() == before

    # a crash half-way through writing the PNG (disk full, killed): matplotlib's writer emits some
    # bytes into the file it was given, then fails
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    real_print_png = FigureCanvasAgg.print_png

    def half_write(self, fname, **kwargs):
        if not isinstance(fname, (str, os.PathLike)):  # matplotlib's in-memory layout pass
            return real_print_png(self, fname, **{k: v for k, v in kwargs.items() if k in ("metadata", "pil_kwargs")})
        with open(fname, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        raise OSError("No space left on device")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", half_write)
    with pytest.raises(OSError, match="No space"):
        plot_recall_curves(CURVES, path)
    with pytest.raises(OSError, match="No space"):
        plot_recall_curves(CURVES, tmp_path / "never.png")
    assert path.read_bytes() == before
    assert not (tmp_path / "never.png").exists()
    assert _no_partials(tmp_path)


def _history(path: Path, rows: int = 6) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "loss", "val_recall@1", "val_recall@5", "val_recall@10"])
        for e in range(1, rows + 1):
            w.writerow([e, 1.0 / e, 40 + 5 * e, 55 + 4 * e, 60 + 3 * e])
    return path


def test_history_png_and_bad_csv(tmp_path: Path) -> None:
    both = _png(plot_history(_history(tmp_path / "h.csv"), tmp_path / "h.png"))
    loss_only = tmp_path / "l.csv"
    loss_only.write_text("epoch,loss\n1,0.5\n2,0.4\n")
    single = _png(plot_history(loss_only, tmp_path / "l.png"))
    assert both.width > 1.6 * single.width  # recall columns add a second panel
    assert _count_color(both, (44, 160, 44)) > 100  # third recall curve (recall@10) drawn

    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,loss\n1,abc\n")
    with pytest.raises(InputError, match=r"bad\.csv: line 2"):
        plot_history(bad, tmp_path / "bad.png")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InputError, match="empty.csv"):
        plot_history(empty, tmp_path / "empty.png")
    with pytest.raises(InputError, match="file not found"):
        plot_history(tmp_path / "missing.csv", tmp_path / "m.png")
    assert not any((tmp_path / n).exists() for n in ("bad.png", "empty.png", "m.png"))
    assert _no_partials(tmp_path)


def test_retrievals_frames_on_real_photos(tmp_path: Path, landmark_images: list[Path]) -> None:
    q, db = landmark_images[0], landmark_images[1:5]
    mixed = _png(plot_retrievals(q, db, [True, False, True, False], tmp_path / "mixed.png"))
    right = _png(plot_retrievals(q, db, [True] * 4, tmp_path / "right.png"))
    assert mixed.width > 3 * mixed.height  # one row: query + 4
    red, green = (214, 39, 40), (26, 156, 60)
    assert _count_color(mixed, red, 6) > 1000 and _count_color(mixed, green, 6) > 1000
    assert _count_color(right, red, 6) < 50 < 1000 < _count_color(right, green, 6)

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(landmark_images[1].read_bytes()[:200])
    with pytest.raises(InputError, match="corrupt.jpg"):
        plot_retrievals(q, [corrupt], [True], tmp_path / "c.png")
    with pytest.raises(InputError):
        plot_retrievals(q, db, [True], tmp_path / "n.png")  # flags do not match
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "n.png").exists()
    assert _no_partials(tmp_path)


def test_attention_overlay_on_real_photo(tmp_path: Path, landmark_images: list[Path]) -> None:
    img = landmark_images[5]
    # attention peaked in the top-left corner at every level
    maps = {
        lvl: np.pad(np.ones((2, 2)), ((0, s - 2), (0, 2 * s - 2))) for lvl, s in (("low", 16), ("mid", 8), ("high", 4))
    }
    out = _png(plot_attention(img, maps, tmp_path / "att.png", strides={"low": 8, "mid": 16, "high": 32}))
    assert out.width > 2.5 * out.height  # image + 3 level panels
    a = np.asarray(out).astype(int)
    reddish = (a[..., 0] > 150) & (a[..., 2] < 110) & (a[..., 1] < 150)
    bluish = (a[..., 2] > 150) & (a[..., 0] < 110)
    assert reddish.sum() > 500 and bluish.sum() > reddish.sum()  # small hot spot, cold elsewhere

    with pytest.raises(InputError, match="level 'mid'"):
        plot_attention(img, {"low": maps["low"], "mid": np.zeros((2, 3, 4))}, tmp_path / "bad.png")
    with pytest.raises(InputError, match="non-finite"):
        plot_attention(img, {"low": np.full((4, 4), np.nan)}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists() and _no_partials(tmp_path)


def test_weights_table_png(tmp_path: Path) -> None:
    rows = [
        {"dataset": "Pitts250k-test", "w1": 0.1, "w2": 0.4, "w3": 0.5, "recall@5": 93.1},
        {"dataset": "Tokyo 24/7", "w1": 0.2, "w2": 0.3, "w3": 0.5, "recall@5": 80.2},
    ]
    im = _png(plot_weights_table(rows, tmp_path / "w.png"))
    assert im.width > im.height and im.width > 400
    assert _count_color(im, (0xE8, 0xED, 0xF5), 3) > 1000  # header row shading
    with pytest.raises(InputError, match="lacks column"):
        plot_weights_table([{"dataset": "x", "w1": 1.0}], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_seed_spread_png(tmp_path: Path) -> None:
    panels = {"ie_tower": {"HAF": [60.0, 62.5, 65.0], "GeM": [58.0, 59.0]}, "synthetic": {"HAF": [40.0]}}
    out = plot_seed_spread(panels, tmp_path / "spread.png")
    im = _png(out)
    assert im.height > im.width * 0.8  # one panel per group, stacked
    assert _count_color(im, (209, 73, 91)) > 20  # the seeds' dots are drawn
    with pytest.raises(InputError, match="finite"):
        plot_seed_spread({"a": {"HAF": [float("nan")]}}, tmp_path / "bad.png")
    with pytest.raises(InputError, match="no values"):
        plot_seed_spread({"a": {"HAF": []}}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists() and _no_partials(tmp_path)


def test_markdown_table_exact() -> None:
    rows = [{"method": "HAF|v2", "r@1": 70.125, "n": 3}, {"method": "NetVLAD", "r@1": 65.0}]
    assert markdown_table(rows, ["method", "r@1", "n"]) == (
        "| method | r@1 | n |\n|---|---:|---:|\n| HAF\\|v2 | 70.12 | 3 |\n| NetVLAD | 65.00 |  |\n"
    )
    assert markdown_table([{"x": 0.5}], ["x"], floatfmt=".1%") == "| x |\n|---:|\n| 50.0% |\n"


def test_html_table_escapes_exact() -> None:
    got = html_table([{"m": '<b>&"x"', "v": 0.5}], ["m", "v"], headers={"v": "R<5>"})
    assert got == (
        "<table>\n<thead><tr><th>m</th><th>R&lt;5&gt;</th></tr></thead>\n<tbody>\n"
        '<tr><td>&lt;b&gt;&amp;&quot;x&quot;</td><td class="num">0.50</td></tr>\n</tbody></table>'
    )


def _report(tmp_path: Path) -> Path:
    out = tmp_path / "report"
    plot_recall_curves(CURVES, out / "img" / "recall curves.png", title="demo")  # space: src must be quoted
    plot_weights_table([{"dataset": "d", "w1": 0.2, "w2": 0.3, "w3": 0.5, "recall@5": 88.0}], out / "w.png")
    plot_history(_history(tmp_path / "h.csv"), out / "history.png")
    return write_report(
        out,
        "Eval <HAF> & co",
        [
            Section(
                "Results",
                paragraphs=["<script>alert(1)</script> stays text"],
                tables=[
                    Table(
                        [{"method": "HAF", "recall@1": 71.234}, {"method": "Net<VLAD>", "recall@1": 65.5}],
                        ["method", "recall@1"],
                        caption="Recall at 25 m",
                    )
                ],
                images=[ReportImage("img/recall curves.png", "Recall@N"), ReportImage(out / "w.png", "weights")],
            ),
            Section(
                "Training",
                images=[ReportImage("history.png", "history")],
                pre='{"lr": 1e-4, "k": "<v>"}',
                pre_caption="config.json",
            ),
        ],
    )


def test_report_html_self_contained_and_escaped(tmp_path: Path) -> None:
    page = _report(tmp_path)
    assert page == tmp_path / "report" / "index.html"
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "Net&lt;VLAD&gt;" in text
    assert "<title>Eval &lt;HAF&gt; &amp; co</title>" in text
    assert 'src="img/recall%20curves.png"' in text and 'src="w.png"' in text  # relative, quoted
    assert "&quot;k&quot;: &quot;&lt;v&gt;&quot;" in text
    assert _no_partials(page.parent)
    # images must exist inside the report folder: no broken or absolute links
    with pytest.raises(InputError, match="not found"):
        render_report(page.parent, "t", [Section("s", images=[ReportImage("nope.png")])])
    with pytest.raises(InputError, match="inside the report folder"):
        render_report(page.parent, "t", [Section("s", images=[ReportImage(tmp_path / "h.csv")])])
    with pytest.raises(InputError, match="inside the report folder"):
        render_report(page.parent, "t", [Section("s", images=[ReportImage("../h.csv")])])


@pytest.mark.browser
def test_report_renders_in_chromium(tmp_path: Path) -> None:
    reason = browser_available()
    if reason:
        pytest.skip(reason)
    page_path = _report(tmp_path)
    with open_page(page_path) as (page, console_errors, failed_requests):
        assert page.evaluate("document.images.length") == 3
        assert images_loaded(page) == []
        cell = page.locator("td", has_text="Net<VLAD>")
        assert cell.is_visible() and cell.inner_text() == "Net<VLAD>"
        assert page.locator("td.num").first.inner_text() == "71.23"
        assert page.locator("h1").inner_text() == "Eval <HAF> & co"
        # images are scaled to the container, never wider than the page
        assert (
            page.evaluate("Math.max(...Array.from(document.images).map(i => i.getBoundingClientRect().right))")
            <= page.viewport_size["width"]
        )
        shot = screenshot(page, tmp_path / "shot.png")
    assert console_errors == [] and failed_requests == []
    assert _png(shot).height > 900


@pytest.mark.browser
def test_harness_reports_broken_images(tmp_path: Path) -> None:
    """The harness itself must see a missing image and a page error (else the test above proves nothing)."""
    reason = browser_available()
    if reason:
        pytest.skip(reason)
    html = tmp_path / "broken.html"
    html.write_text('<!DOCTYPE html><html><body><img src="missing.png"><script>undefinedFn()</script></body></html>')
    with open_page(html) as (page, console_errors, failed_requests):
        assert [s.rsplit("/", 1)[-1] for s in images_loaded(page)] == ["missing.png"]
    assert any("missing.png" in r for r in failed_requests)
    assert any("undefinedFn" in e for e in console_errors)

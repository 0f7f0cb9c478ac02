"""Draw docs/img/pipeline.png: the data's path through HAF (run: python docs/img/make_pipeline.py).

A PNG rather than a mermaid block, because material's mermaid loads its script from a CDN and the
site must work offline.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_name("pipeline.png")


def box(ax, x, y, w, h, text, color):
    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="#333333", lw=1.2
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=9)


def arrow(ax, x0, y0, x1, y1):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=1.2, color="#333333"))


def main() -> None:
    fig, ax = plt.subplots(figsize=(12, 4.6))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 4.6)
    ax.axis("off")
    box(ax, 0.8, 2.3, 1.3, 0.9, "photo\nRGB, sides\nmultiples of 32", "#f2f2f2")
    box(ax, 2.65, 2.3, 1.6, 1.3, "backbone\nEfficientNet-Lite0\n(or VGG16)\none forward pass", "#dbe9f6")
    levels = [("low", "stride 8, 40 ch", 3.7), ("mid", "stride 16, 112 ch", 2.3), ("high", "stride 32, 320 ch", 0.9)]
    arrow(ax, 1.45, 2.3, 1.85, 2.3)
    for name, info, y in levels:
        arrow(ax, 3.45, 2.3, 4.15, y)
        box(ax, 4.85, y, 1.4, 0.8, f"{name} map\n{info}", "#e8f3e0")
        arrow(ax, 5.55, y, 5.95, y)
        box(ax, 6.75, y, 1.6, 0.8, "attention a_l\n(context filters,\nsoftplus)", "#fde9d9")
        arrow(ax, 7.55, y, 7.95, y)
        box(ax, 8.75, y, 1.75, 0.8, "1x1 projection,\nNetVLAD (K clusters)\nweighted by a_l", "#fde9d9")
        arrow(ax, 9.55, y, 10.0, 2.3)
    box(ax, 10.55, 2.3, 1.1, 1.3, "fuse\nconcat of\nsqrt(w_l) V_l", "#e4dff2")
    arrow(ax, 11.1, 2.3, 11.35, 2.3)
    box(ax, 11.65, 2.3, 0.6, 1.3, "PCA\nwhiten\n+ L2", "#f2f2f2")
    ax.text(
        6, 4.45, "HAF: one descriptor per photo from three levels of one CNN", ha="center", fontsize=11, weight="bold"
    )
    ax.text(
        6,
        0.15,
        "cosine of two descriptors = sum_l w_l cos_l; the nearest indexed photos give the position",
        ha="center",
        fontsize=9,
        style="italic",
    )
    fig.savefig(OUT, dpi=110, bbox_inches="tight")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

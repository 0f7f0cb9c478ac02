"""Attention maps of the shipped default model on real photos: docs/img/attention-*.png.

python docs/img/make_attention.py        # needs ../shared/data beside the repository
"""

from __future__ import annotations

from pathlib import Path

from hafloc.descriptors.extract import Extractor
from hafloc.descriptors.modelfile import load_model
from hafloc.images.io import load_image
from hafloc.reports import plot_attention

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "data"
PHOTOS = {
    "lund": SHARED / "lund_gps" / "images" / "21.jpg",
    "gardens-night": SHARED / "gardenspoint_mini" / "vprtutorial_first10" / "ref" / "5.jpg",
    "landmark": SHARED / "landmarks_mini" / "images" / "st_pauls_cathedral_30776973_2635313996.jpg",
}


def main() -> None:
    model = load_model(None)
    ex = Extractor(model)
    for name, path in PHOTOS.items():
        if not path.is_file():
            print(f"{path}: not found, skipped")
            continue
        image = load_image(path)
        out = ex.describe_image(image)
        plot_attention(image, out["attention"], HERE / f"attention-{name}.png", strides=model.backbone.strides)
        print(f"wrote {HERE / f'attention-{name}.png'}")


if __name__ == "__main__":
    main()

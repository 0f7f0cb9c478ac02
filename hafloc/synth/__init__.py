"""Synthetic street-world generator for the demo: writes an '@'-layout dataset with ``meta.json``.

Each place is a stretch of street: a row of facades drawn from a few shared styles (so that a
wrong place looks plausible) and one place-specific landmark (a framed crop of a scikit-image
sample photo on a pedestal). Database images are daytime views; queries are mostly dusk/night
views of the same place from another viewpoint, with the landmark at a different apparent size.
Each query's size class (the landmark's width in the query: small ~5-10 %, medium ~20-30 %,
large ~50 %+ of the image width) goes in its ``note`` field and in ``meta.json``.

Apparent size changes come from the viewing distance of a pinhole camera (parallax between
landmark and facades included); the recorded GPS positions are the place's position jittered
by a few metres, so every query has a same-place database image within 10 m and every other
place is more than 25 m away. Splits lie in disjoint areas of UTM zone 17T (Pittsburgh-like).

Modules, in the order of the data: ``config`` (what to make), ``assets`` (textures), ``scene``
(places and camera views), ``render`` (one view to pixels), ``write`` (the dataset on disk).
Reading a generated city back, and the constants of its ``meta.json``: :mod:`hafloc.datasets.synthetic`.
"""

from hafloc.synth.config import CONDITIONS, SIZE_CLASSES, SPLITS, SyntheticCityConfig
from hafloc.synth.write import generate_city

__all__ = ["SyntheticCityConfig", "generate_city", "SPLITS", "SIZE_CLASSES", "CONDITIONS"]

"""What an extraction returns, light enough for the index to import without torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hafloc.local import LocalFeatures


@dataclass
class ExtractResult:
    """Descriptors of the images that could be read, in input order, and why the others failed.

    ``local``: name -> local features, when the extraction also described images locally (the
    index's re-ranking); empty for a global-only extraction.
    """

    names: list[str]
    descriptors: np.ndarray  # (N, D) float32, L2-normalised
    failures: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    local: dict[str, LocalFeatures] = field(default_factory=dict)

"""hafloc: visual geo-localization with Hierarchical Attention Fusion (ICASSP 2021).

Where was this photo taken? ``hafloc.Index.open("my.index").locate("photo.jpg")``. The public
names are ``__all__`` (documented first in docs/api.md); they load on first use, so importing a
submodule (the command line's, say) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .api import EvalResult, ExtractResult, Index, LocateResult, evaluate, extract, load_model

__all__ = [
    "Index",
    "LocateResult",
    "load_model",
    "extract",
    "ExtractResult",
    "evaluate",
    "EvalResult",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'hafloc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""hafloc: visual geo-localization with Hierarchical Attention Fusion (ICASSP 2021)."""

__version__ = "0.1.0"

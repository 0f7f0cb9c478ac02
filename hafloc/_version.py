"""The package version (one place: ``hafloc.__version__`` re-exports it)."""

__version__ = "0.1.0"

"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data folder (../shared/data beside the repo; env HAFLOC_SHARED_DATA overrides)."""
    env = os.environ.get("HAFLOC_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real test data not found at {path} (set HAFLOC_SHARED_DATA to its location)")
    return path

"""Heads: one registry, one ``create_head``."""

from __future__ import annotations

import dataclasses

from ..errors import HaflocError
from .base import METHOD_DEFAULTS, Head, HeadConfig
from .gem import GeM
from .multilevel import MultiLevelVLAD
from .superpoint import SuperPointVLAD

HEADS = {
    "haf": MultiLevelVLAD,
    "netvlad": MultiLevelVLAD,
    "crn": MultiLevelVLAD,
    "gem": GeM,
    "superpoint": SuperPointVLAD,
}
METHODS = tuple(HEADS)  # the one list of method names: CLI choices, configs and the demo read it
LABELS = {"haf": "HAF", "netvlad": "NetVLAD", "crn": "CRN", "gem": "GeM", "superpoint": "SuperPoint"}  # for tables
assert set(LABELS) == set(HEADS), "every registered head needs its display label"


LEVELS = ("low", "mid", "high")  # the backbone taps a head can read (strides 8, 16, 32)
# methods whose levels and attention are settings (the ablation's variants: HAF without attention,
# HAF on one level); GeM and SuperPoint read one fixed map
CONFIGURABLE_LEVELS = ("haf", "netvlad", "crn")


def head_config(method: str, **overrides) -> HeadConfig:
    """The method's default configuration with ``overrides`` (None values ignored).

    ``levels`` (a non-empty subset of ``LEVELS``, in fusion order) and ``attention`` may be
    changed for the VLAD heads only (``CONFIGURABLE_LEVELS``).
    """
    if method not in HEADS:
        raise HaflocError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    base = METHOD_DEFAULTS[method]
    if "levels" in overrides:
        levels = tuple(overrides["levels"])
        if not levels or len(set(levels)) != len(levels) or set(levels) - set(LEVELS):
            raise HaflocError(f"levels must be distinct names among {', '.join(LEVELS)}, got {list(levels)}")
        overrides["levels"] = levels
    for key in ("levels", "attention"):
        if key in overrides and overrides[key] != getattr(base, key) and method not in CONFIGURABLE_LEVELS:
            raise HaflocError(f"method {method!r} has no {key} setting (only {', '.join(CONFIGURABLE_LEVELS)})")
    if "levels" in overrides and len(overrides["levels"]) > 1 and overrides.get("proj_dim", base.proj_dim) is None:
        raise HaflocError("several levels need a projection dimension (proj_dim): levels must share one dimension")
    return dataclasses.replace(base, **overrides)


def create_head(method: str, channels: dict[str, int], conf: HeadConfig | None = None) -> Head:
    conf = conf or head_config(method)
    return HEADS[method](channels, conf)


__all__ = [
    "CONFIGURABLE_LEVELS",
    "HEADS",
    "LABELS",
    "LEVELS",
    "METHODS",
    "Head",
    "HeadConfig",
    "create_head",
    "head_config",
]

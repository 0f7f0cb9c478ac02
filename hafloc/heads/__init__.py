"""Heads: one registry, one ``create_head``."""

from __future__ import annotations

import dataclasses

from ..errors import HaflocError
from .base import METHOD_DEFAULTS, Head, HeadConfig
from .gem import GeM
from .multilevel import MultiLevelVLAD
from .superpoint import SuperPointVLAD

HEADS = {"haf": MultiLevelVLAD, "netvlad": MultiLevelVLAD, "crn": MultiLevelVLAD, "gem": GeM, "superpoint": SuperPointVLAD}
METHODS = tuple(HEADS)  # the one list of method names: CLI choices, configs and the demo read it
LABELS = {"haf": "HAF", "netvlad": "NetVLAD", "crn": "CRN", "gem": "GeM", "superpoint": "SuperPoint"}  # for tables
assert set(LABELS) == set(HEADS), "every registered head needs its display label"


def head_config(method: str, **overrides) -> HeadConfig:
    """The method's default configuration with ``overrides`` (None values ignored)."""
    if method not in HEADS:
        raise HaflocError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return dataclasses.replace(METHOD_DEFAULTS[method], **{k: v for k, v in overrides.items() if v is not None})


def create_head(method: str, channels: dict[str, int], conf: HeadConfig | None = None) -> Head:
    conf = conf or head_config(method)
    return HEADS[method](channels, conf)


__all__ = ["HEADS", "LABELS", "METHODS", "Head", "HeadConfig", "create_head", "head_config"]

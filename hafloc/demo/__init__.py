"""``hafloc demo``: the whole system on a synthetic city, end to end, with an HTML report.

The orchestration sits on top of every other layer (like ``cli``): it calls the library's
generator, training, tuning and evaluation functions and writes files between stages.
"""

from hafloc.demo.config import DEMO_METHODS, DemoConfig
from hafloc.demo.pipeline import recall_by_group, run_demo

__all__ = ["DEMO_METHODS", "DemoConfig", "recall_by_group", "run_demo"]

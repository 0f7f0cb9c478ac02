"""Training: tuple mining, losses (dD, triplet, SARE); the loop and weight tuning live beside them."""

from hafloc.train.losses import (
    LOSSES,
    LossSpec,
    compute_loss,
    dd_triplet_loss,
    default_loss_for,
    detection_weighted_distance,
    sare_loss,
    triplet_loss,
)
from hafloc.train.mining import HardNegativeMiner, gps_candidates, label_candidates

__all__ = [
    "LOSSES",
    "HardNegativeMiner",
    "LossSpec",
    "compute_loss",
    "dd_triplet_loss",
    "default_loss_for",
    "detection_weighted_distance",
    "gps_candidates",
    "label_candidates",
    "sare_loss",
    "triplet_loss",
]

"""Training losses: HAF's detection-weighted distance (dD) triplet, NetVLAD's triplet, SARE.

Every tuple loss takes one query, one positive and N negatives per batch row:
query/positive tensors are (B, ...) and negatives (B, N, ...). Tuples may hold fewer than N
real negatives: ``neg_mask`` (B, N) bool marks the real ones (padding is ignored; pad with
finite values, e.g. zeros).

Reductions (``reduction=``), applied to the per-triplet hinge terms l(q, p, n_j):
- ``"query"`` (default): sum over the tuple's negatives (the paper's "summed over the negatives
  of a tuple", NetVLAD's L_theta), then the mean over the queries that have at least one real
  negative.
- ``"triplet"``: the sum over all real triplets divided by their number (what the NetVLAD
  MATLAB code's update 1/#triplets and pytorch-NetVLAD's ``loss /= nNeg`` amount to).
- ``"sum"``: the plain sum.
A batch with no real negative gives a zero that still backpropagates (to nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..heads import METHODS

__all__ = [
    "LOSSES",
    "LossSpec",
    "compute_loss",
    "dd_triplet_loss",
    "default_loss_for",
    "detection_weighted_distance",
    "sare_loss",
    "triplet_loss",
]

_REDUCTIONS = ("query", "triplet", "sum")


def detection_weighted_distance(s_q: Tensor, K_q: Tensor, s_r: Tensor, K_r: Tensor, eps: float = 1e-8) -> Tensor:
    """HAF's detection-weighted distance dD(q, r), per pair.

    dD(q, r) = sum_c [ s_q^c s_r^c / sum_c' s_q^c' s_r^c' ] * || K_q^c - K_r^c ||_2

    Args:
        s_q: (B, K) non-negative cluster scores of the queries (attention-weighted assignment mass).
        K_q: (B, K, D) per-cluster residuals of the queries (intra-normalised, sqrt(w_l)-scaled).
        s_r: (B, K) or (B, N, K) scores of the references (N negatives per query, say).
        K_r: (B, K, D) or (B, N, K, D) residuals of the references.
        eps: the norm is sqrt(sum sq + eps), so identical residuals (empty clusters) have a
            finite gradient instead of NaN; it also floors the weight normaliser.

    Returns:
        (B,) or (B, N) distances. When every s_q^c s_r^c is 0 (no shared content) the weights
        are 0 and dD is 0: the formula has no better answer, and soft assignments never get there.
    """
    if K_q.dim() != s_q.dim() + 1 or K_q.shape[:-1] != s_q.shape:
        raise ValueError(f"query scores {tuple(s_q.shape)} and residuals {tuple(K_q.shape)} disagree")
    if K_r.dim() != s_r.dim() + 1 or K_r.shape[:-1] != s_r.shape:
        raise ValueError(f"reference scores {tuple(s_r.shape)} and residuals {tuple(K_r.shape)} disagree")
    extra = s_r.dim() - s_q.dim()
    if extra < 0:
        raise ValueError("references must have at least the query's dimensions")
    # the reference's extra dims (negatives) sit right after the batch dim
    for _ in range(extra):
        s_q = s_q.unsqueeze(1)
        K_q = K_q.unsqueeze(1)
    w = s_q * s_r
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(eps)
    dist = torch.sqrt(((K_q - K_r) ** 2).sum(dim=-1) + eps)
    return (w * dist).sum(dim=-1)


def _reduce(hinge: Tensor, neg_mask: Tensor | None, reduction: str) -> Tensor:
    """Reduce (B, N) per-triplet terms according to ``reduction`` (see the module docstring)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")
    if neg_mask is None:
        mask = torch.ones_like(hinge, dtype=torch.bool)
    else:
        if neg_mask.shape != hinge.shape:
            raise ValueError(f"neg_mask {tuple(neg_mask.shape)} does not match {tuple(hinge.shape)}")
        mask = neg_mask.to(dtype=torch.bool, device=hinge.device)
    # where(), not multiplication: padded entries must not leak even a NaN gradient
    terms = torch.where(mask, hinge, torch.zeros_like(hinge))
    if reduction == "sum":
        return terms.sum()
    if reduction == "triplet":
        return terms.sum() / mask.sum().clamp_min(1)
    has_neg = mask.any(dim=1)
    return terms.sum(dim=1)[has_neg].sum() / has_neg.sum().clamp_min(1)


def _as_neg_batch(x: Tensor, ref: Tensor) -> Tensor:
    """Give single negatives (one per query, shaped like ``ref``) an N=1 axis."""
    return x.unsqueeze(1) if x.dim() == ref.dim() else x


def dd_triplet_loss(
    q: Mapping[str, Tensor],
    p: Mapping[str, Tensor],
    negs: Mapping[str, Tensor],
    margin: float = 0.1,
    neg_mask: Tensor | None = None,
    reduction: str = "query",
    eps: float = 1e-8,
) -> Tensor:
    """HAF's loss: sum over negatives of max(M + dD(q, p) - dD(q, n), 0), then ``reduction``.

    ``q``, ``p``: head outputs with ``scores`` (B, K) and ``residuals`` (B, K, D); ``negs``:
    ``scores`` (B, N, K) and ``residuals`` (B, N, K, D) (or (B, K)/(B, K, D) for one negative).
    The margin M is ours (0.1 by default): the paper does not state it. dD is a weighted mean
    of per-cluster distances between unit (or zero) residuals scaled by sqrt(w_l), so it lies in
    [0, 2 max_l sqrt(w_l)].
    """
    s_n = _as_neg_batch(negs["scores"], q["scores"])
    K_n = _as_neg_batch(negs["residuals"], q["residuals"])
    d_pos = detection_weighted_distance(q["scores"], q["residuals"], p["scores"], p["residuals"], eps)
    d_neg = detection_weighted_distance(q["scores"], q["residuals"], s_n, K_n, eps)
    hinge = torch.relu(margin + d_pos.unsqueeze(1) - d_neg)
    return _reduce(hinge, neg_mask, reduction)


def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b) ** 2).sum(dim=-1)


def triplet_loss(
    q_desc: Tensor,
    p_desc: Tensor,
    n_desc: Tensor,
    margin: float = 0.1,
    squared: bool = True,
    neg_mask: Tensor | None = None,
    reduction: str = "query",
    eps: float = 1e-12,
) -> Tensor:
    """NetVLAD's triplet ranking loss on global descriptors, summed over negatives.

    l(q, p, n) = max(d(q, p) + m - d(q, n), 0) with q, p (B, D) and n (B, N, D) or (B, D).

    Conventions (checked against the sources):
    - ``squared=True`` (default) is the NetVLAD paper's and its official MATLAB code's loss:
      d = squared Euclidean distance, margin m = 0.1 (Arandjelovic et al., CVPR 2016, eq. 7;
      Relja/netvlad ``trainWeakly.m``: ``max(dPos + opts.margin - dsSq, 0)``, margin 0.1).
    - ``squared=False`` uses plain Euclidean distances with the margin as given. This is
      pytorch-NetVLAD (Nanne/pytorch-NetVlad ``main.py``), which calls
      ``nn.TripletMarginLoss(margin=opt.margin**0.5, p=2, reduction='sum')``, i.e. un-squared
      distances with m = sqrt(0.1): pass ``margin=0.1**0.5`` to reproduce it. (OpenIBL instead
      uses un-squared distances with m = 0.1.)
    Squared is the default because it is the published loss and, on L2-normalised descriptors,
    its gradient is finite everywhere (the L2 norm's is not at 0; ``eps`` guards that case).
    """
    n_desc = _as_neg_batch(n_desc, q_desc)
    d_pos = _sq_dist(q_desc, p_desc)
    d_neg = _sq_dist(q_desc.unsqueeze(1), n_desc)
    if not squared:
        d_pos = torch.sqrt(d_pos + eps)
        d_neg = torch.sqrt(d_neg + eps)
    hinge = torch.relu(d_pos.unsqueeze(1) + margin - d_neg)
    return _reduce(hinge, neg_mask, reduction)


def sare_loss(
    q_desc: Tensor,
    p_desc: Tensor,
    n_desc: Tensor,
    variant: str = "joint",
    neg_mask: Tensor | None = None,
) -> Tensor:
    """SARE (Liu et al., ICCV 2019) with squared Euclidean distances, mean over queries.

    ``"joint"``: -log( exp(-d_qp) / (exp(-d_qp) + sum_n exp(-d_qn)) ) per query.
    ``"ind"``: sum over negatives of -log( exp(-d_qp) / (exp(-d_qp) + exp(-d_qn)) )
    = sum_n softplus(d_qp - d_qn), then the ``"query"`` reduction.
    (OpenIBL averages the "ind" terms over all pairs instead; that is our ``"triplet"`` scale.)
    """
    n_desc = _as_neg_batch(n_desc, q_desc)
    d_pos = _sq_dist(q_desc, p_desc)  # (B,)
    d_neg = _sq_dist(q_desc.unsqueeze(1), n_desc)  # (B, N)
    mask = torch.ones_like(d_neg, dtype=torch.bool) if neg_mask is None else neg_mask.to(torch.bool)
    if variant == "ind":
        return _reduce(torch.nn.functional.softplus(d_pos.unsqueeze(1) - d_neg), mask, "query")
    if variant != "joint":
        raise ValueError(f"unknown SARE variant {variant!r}; expected 'joint' or 'ind'")
    neg_logits = torch.where(mask, -d_neg, torch.full_like(d_neg, float("-inf")))
    logits = torch.cat([-d_pos.unsqueeze(1), neg_logits], dim=1)
    nll = -torch.log_softmax(logits, dim=1)[:, 0]
    has_neg = mask.any(dim=1)
    return nll[has_neg].sum() / has_neg.sum().clamp_min(1)


# ---------------------------------------------------------------------------- registry

LossFn = Callable[..., Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A tuple loss as the training loop calls it: ``fn(q, p, negs, margin=, neg_mask=)``.

    ``q``/``p``/``negs`` are head-output dicts (negatives carry an extra N axis); ``needs``
    lists the keys the loss reads, ``default_margin`` is used when the caller gives none.
    """

    fn: LossFn
    needs: tuple[str, ...]
    default_margin: float | None


def _triplet_outputs(
    q: Mapping[str, Tensor],
    p: Mapping[str, Tensor],
    negs: Mapping[str, Tensor],
    margin: float = 0.1,
    neg_mask: Tensor | None = None,
    reduction: str = "query",
) -> Tensor:
    return triplet_loss(
        q["descriptor"],
        p["descriptor"],
        negs["descriptor"],
        margin=margin,
        squared=True,
        neg_mask=neg_mask,
        reduction=reduction,
    )


def _sare_outputs(variant: str) -> LossFn:
    def fn(
        q: Mapping[str, Tensor],
        p: Mapping[str, Tensor],
        negs: Mapping[str, Tensor],
        margin: float | None = None,
        neg_mask: Tensor | None = None,
        reduction: str = "query",
    ) -> Tensor:
        del margin, reduction  # SARE has neither
        return sare_loss(q["descriptor"], p["descriptor"], negs["descriptor"], variant, neg_mask)

    return fn


LOSSES: dict[str, LossSpec] = {
    "dd": LossSpec(dd_triplet_loss, ("scores", "residuals"), 0.1),
    "triplet": LossSpec(_triplet_outputs, ("descriptor",), 0.1),
    "sare_joint": LossSpec(_sare_outputs("joint"), ("descriptor",), None),
    "sare_ind": LossSpec(_sare_outputs("ind"), ("descriptor",), None),
}


def default_loss_for(method: str) -> str:
    """The loss a method trains with by default: HAF -> 'dd', the baselines -> 'triplet'."""
    if method.lower() not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    return "dd" if method.lower() == "haf" else "triplet"


def compute_loss(
    name: str,
    q: Mapping[str, Tensor],
    p: Mapping[str, Tensor],
    negs: Mapping[str, Tensor],
    margin: float | None = None,
    neg_mask: Tensor | None = None,
    reduction: str = "query",
) -> Tensor:
    """Look up ``name`` in LOSSES, check the head outputs carry what it needs, and apply it."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    spec = LOSSES[name]
    for part, out in (("query", q), ("positive", p), ("negatives", negs)):
        missing = [k for k in spec.needs if k not in out]
        if missing:
            raise ValueError(f"loss {name!r} needs {missing} in the {part} outputs (a VLAD head for 'dd')")
    m = spec.default_margin if margin is None else margin
    return spec.fn(q, p, negs, margin=m, neg_mask=neg_mask, reduction=reduction)

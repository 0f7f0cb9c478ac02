"""Losses: dD against hand arithmetic, gradients, triplet/SARE conventions, registry."""

from __future__ import annotations

import math

import pytest
import torch

from hafloc.train.losses import (
    LOSSES,
    compute_loss,
    dd_triplet_loss,
    default_loss_for,
    detection_weighted_distance,
    sare_loss,
    triplet_loss,
)


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_dd_matches_hand_computation():
    # K=2 clusters, D=2.  products s_q*s_r = [1*2, 3*1] = [2, 3] -> weights [0.4, 0.6]
    s_q, s_r = _t([[1.0, 3.0]]), _t([[2.0, 1.0]])
    K_q = _t([[[1.0, 0.0], [0.0, 1.0]]])
    K_r = _t([[[0.0, 0.0], [0.6, 0.8]]])
    d0 = math.sqrt((1.0 - 0.0) ** 2 + (0.0 - 0.0) ** 2)  # 1
    d1 = math.sqrt((0.0 - 0.6) ** 2 + (1.0 - 0.8) ** 2)  # sqrt(0.4)
    expected = (2.0 / 5.0) * d0 + (3.0 / 5.0) * d1
    got = detection_weighted_distance(s_q, K_q, s_r, K_r, eps=0.0)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # default eps only perturbs at the 1e-8 level
    assert detection_weighted_distance(s_q, K_q, s_r, K_r).item() == pytest.approx(expected, abs=1e-7)


def test_dd_uniform_scores_is_mean_of_cluster_distances():
    g = torch.Generator().manual_seed(0)
    B, K, D = 3, 5, 4
    K_q = torch.randn(B, K, D, generator=g, dtype=torch.float64)
    K_r = torch.randn(B, K, D, generator=g, dtype=torch.float64)
    s_q = torch.full((B, K), 0.7, dtype=torch.float64)
    s_r = torch.full((B, K), 2.5, dtype=torch.float64)
    per_cluster = torch.linalg.vector_norm(K_q - K_r, dim=-1)  # (B, K)
    expected = per_cluster.sum(dim=1) / K
    got = detection_weighted_distance(s_q, K_q, s_r, K_r, eps=0.0)
    torch.testing.assert_close(got, expected)


def test_dd_weights_follow_shared_mass_and_ignore_score_scale():
    # all of the mass on cluster 1 -> dD is cluster 1's distance alone
    s_q, s_r = _t([[0.0, 1.0]]), _t([[5.0, 2.0]])
    K_q = _t([[[1.0, 0.0], [0.0, 1.0]]])
    K_r = _t([[[-1.0, 0.0], [0.0, -1.0]]])
    assert detection_weighted_distance(s_q, K_q, s_r, K_r, eps=0.0).item() == pytest.approx(2.0)
    g = torch.Generator().manual_seed(1)
    s_q, s_r = torch.rand(2, 6, generator=g, dtype=torch.float64), torch.rand(2, 6, generator=g, dtype=torch.float64)
    K_q, K_r = (
        torch.randn(2, 6, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 6, 3, generator=g, dtype=torch.float64),
    )
    base = detection_weighted_distance(s_q, K_q, s_r, K_r)
    torch.testing.assert_close(detection_weighted_distance(7.0 * s_q, K_q, 0.1 * s_r, K_r), base)


def test_dd_gradcheck_and_finite_at_identical_residuals():
    g = torch.Generator().manual_seed(2)
    B, N, K, D = 2, 3, 4, 3
    s_q = (torch.rand(B, K, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    K_q = torch.randn(B, K, D, generator=g, dtype=torch.float64).requires_grad_()
    s_r = (torch.rand(B, N, K, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    K_r = torch.randn(B, N, K, D, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(detection_weighted_distance, (s_q, K_q, s_r, K_r))

    # identical residuals (and an all-zero "empty" cluster): no NaN, gradient still passes
    K_same = K_q.detach().clone()
    K_same[:, 0] = 0.0
    K_a = K_same.clone().requires_grad_()
    K_b = K_same.clone().requires_grad_()
    s_a = s_q.detach().clone().requires_grad_()
    out = detection_weighted_distance(s_a, K_a, s_a.detach(), K_b)
    out.sum().backward()
    for t in (K_a.grad, K_b.grad, s_a.grad):
        assert torch.isfinite(t).all()
    assert torch.autograd.gradcheck(detection_weighted_distance, (s_a, K_a, s_a.detach(), K_b))


def test_dd_broadcast_over_negatives_equals_loop():
    g = torch.Generator().manual_seed(3)
    B, N, K, D = 2, 4, 5, 3
    s_q, K_q = torch.rand(B, K, generator=g), torch.randn(B, K, D, generator=g)
    s_n, K_n = torch.rand(B, N, K, generator=g), torch.randn(B, N, K, D, generator=g)
    batched = detection_weighted_distance(s_q, K_q, s_n, K_n)
    assert batched.shape == (B, N)
    for j in range(N):
        torch.testing.assert_close(batched[:, j], detection_weighted_distance(s_q, K_q, s_n[:, j], K_n[:, j]))


def test_dd_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        detection_weighted_distance(torch.rand(2, 3), torch.rand(2, 4, 5), torch.rand(2, 3), torch.rand(2, 3, 5))


def _outputs(s, K):
    return {"scores": s, "residuals": K}


def test_dd_triplet_violation_and_margin():
    # one cluster, uniform scores: dD = ||K_q - K_r||
    s = _t([[1.0]])
    q = _outputs(s, _t([[[0.0, 0.0]]]))
    p = _outputs(s, _t([[[0.3, 0.0]]]))  # dD(q,p) = 0.3
    n_close = _outputs(_t([[[1.0]]]), _t([[[[0.0, 0.35]]]]))  # dD(q,n) = 0.35 < 0.3 + 0.1
    n_far = _outputs(_t([[[1.0]]]), _t([[[[0.0, 0.5]]]]))  # 0.5 >= 0.4
    loss = dd_triplet_loss(q, p, n_close, margin=0.1, eps=0.0)
    assert loss.item() == pytest.approx(0.1 + 0.3 - 0.35, abs=1e-12)
    assert dd_triplet_loss(q, p, n_far, margin=0.1, eps=0.0).item() == 0.0


def test_dd_triplet_sums_negatives_and_masks_padding():
    g = torch.Generator().manual_seed(4)
    B, N, K, D = 3, 5, 4, 3
    q = _outputs(torch.rand(B, K, generator=g), torch.randn(B, K, D, generator=g))
    p = _outputs(torch.rand(B, K, generator=g), torch.randn(B, K, D, generator=g))
    n = _outputs(torch.rand(B, N, K, generator=g), torch.randn(B, N, K, D, generator=g))
    margin = 2.0  # large, so every hinge is active
    total = dd_triplet_loss(q, p, n, margin=margin, reduction="sum")
    looped = sum(
        dd_triplet_loss(
            {k: v[b : b + 1] for k, v in q.items()},
            {k: v[b : b + 1] for k, v in p.items()},
            {k: v[b : b + 1, j] for k, v in n.items()},
            margin=margin,
            reduction="sum",
        )
        for b in range(B)
        for j in range(N)
    )
    torch.testing.assert_close(total, looped)
    torch.testing.assert_close(dd_triplet_loss(q, p, n, margin=margin), total / B)
    torch.testing.assert_close(dd_triplet_loss(q, p, n, margin=margin, reduction="triplet"), total / (B * N))

    # padded negatives (garbage values) are ignored: equals the loss on the real ones only
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, 3:] = False
    n_pad = {k: v.clone() for k, v in n.items()}
    n_pad["residuals"][0, 3:] = 1e3
    masked = dd_triplet_loss(q, p, n_pad, margin=margin, neg_mask=mask, reduction="sum")
    expected = total - sum(
        dd_triplet_loss(
            {k: v[:1] for k, v in q.items()},
            {k: v[:1] for k, v in p.items()},
            {k: v[:1, j] for k, v in n.items()},
            margin=margin,
            reduction="sum",
        )
        for j in (3, 4)
    )
    torch.testing.assert_close(masked, expected)


def test_triplet_loss_hand_computation_squared():
    q, p = [1.0, 0.0], [0.8, 0.6]
    n1, n2 = [0.6, 0.8], [0.0, 1.0]
    d_qp = (1.0 - 0.8) ** 2 + (0.0 - 0.6) ** 2  # 0.4
    d_qn1 = (1.0 - 0.6) ** 2 + (0.0 - 0.8) ** 2  # 0.8
    d_qn2 = (1.0 - 0.0) ** 2 + (0.0 - 1.0) ** 2  # 2.0
    margin = 0.5
    expected = max(d_qp + margin - d_qn1, 0.0) + max(d_qp + margin - d_qn2, 0.0)  # 0.1 + 0
    got = triplet_loss(_t([q]), _t([p]), _t([[n1, n2]]), margin=margin)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.1)
    # NetVLAD's default margin 0.1: 0.4 + 0.1 < 0.8 -> exactly zero
    assert triplet_loss(_t([q]), _t([p]), _t([[n1, n2]])).item() == 0.0


def test_triplet_loss_unsquared_matches_pytorch_netvlad_convention():
    g = torch.Generator().manual_seed(5)
    B, N, D = 4, 3, 8
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    p = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    n = torch.nn.functional.normalize(torch.randn(B, N, D, generator=g, dtype=torch.float64), dim=2)
    m = 0.1**0.5
    ref = torch.nn.TripletMarginLoss(margin=m, p=2, reduction="sum", eps=0.0)
    expected = sum(ref(q[b : b + 1], p[b : b + 1], n[b : b + 1, j]) for b in range(B) for j in range(N))
    got = triplet_loss(q, p, n, margin=m, squared=False, reduction="sum", eps=0.0)
    torch.testing.assert_close(got, expected)


def test_sare_sanity():
    q, p = _t([[1.0, 0.0]]), _t([[0.8, 0.6]])
    n = _t([[[0.6, 0.8], [0.0, 1.0]]])
    d_qp, d_qn = 0.4, [0.8, 2.0]
    joint = -math.log(math.exp(-d_qp) / (math.exp(-d_qp) + sum(math.exp(-d) for d in d_qn)))
    ind = sum(-math.log(math.exp(-d_qp) / (math.exp(-d_qp) + math.exp(-d))) for d in d_qn)
    assert sare_loss(q, p, n, "joint").item() == pytest.approx(joint, abs=1e-12)
    assert sare_loss(q, p, n, "ind").item() == pytest.approx(ind, abs=1e-12)
    # a negative moving away lowers the loss; with one negative the variants agree
    farther = _t([[[-0.6, 0.8], [0.0, 1.0]]])
    assert sare_loss(q, p, farther).item() < sare_loss(q, p, n).item()
    torch.testing.assert_close(sare_loss(q, p, n[:, :1], "joint"), sare_loss(q, p, n[:, :1], "ind"))
    # masked negatives are ignored
    mask = torch.tensor([[True, False]])
    torch.testing.assert_close(sare_loss(q, p, n, "joint", neg_mask=mask), sare_loss(q, p, n[:, :1], "joint"))


def test_registry_and_defaults():
    assert default_loss_for("haf") == "dd"
    for m in ("netvlad", "crn", "gem", "superpoint"):
        assert default_loss_for(m) == "triplet"
    with pytest.raises(ValueError):
        default_loss_for("nonsense")
    assert set(LOSSES) >= {"dd", "triplet", "sare_joint", "sare_ind"}

    g = torch.Generator().manual_seed(6)
    B, N, K, D = 2, 3, 4, 5
    q = {"descriptor": torch.randn(B, 7, generator=g)}
    p = {"descriptor": torch.randn(B, 7, generator=g)}
    n = {"descriptor": torch.randn(B, N, 7, generator=g)}
    torch.testing.assert_close(
        compute_loss("triplet", q, p, n), triplet_loss(q["descriptor"], p["descriptor"], n["descriptor"], margin=0.1)
    )
    with pytest.raises(ValueError, match="scores"):
        compute_loss("dd", q, p, n)
    q.update(scores=torch.rand(B, K, generator=g), residuals=torch.randn(B, K, D, generator=g))
    p.update(scores=torch.rand(B, K, generator=g), residuals=torch.randn(B, K, D, generator=g))
    n.update(scores=torch.rand(B, N, K, generator=g), residuals=torch.randn(B, N, K, D, generator=g))
    torch.testing.assert_close(compute_loss("dd", q, p, n, margin=0.3), dd_triplet_loss(q, p, n, margin=0.3))


def test_losses_backpropagate_to_inputs():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 6, generator=g, requires_grad=True)
    p, n = torch.randn(2, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    loss = triplet_loss(q, p, n, margin=10.0) + sare_loss(q, p, n)
    loss.backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    # no real negative at all: zero loss that still backpropagates
    z = triplet_loss(q, p, n, neg_mask=torch.zeros(2, 4, dtype=torch.bool))
    assert z.item() == 0.0
    z.backward()

"""Preference losses against hand-computed values (math, not the code under test)."""

from __future__ import annotations

import math

import pytest
import torch

from tristage.rollout import sequence_logprobs
from tristage.train.losses import bradley_terry_loss, dpo_loss, log1mexp, rating_loss


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sequence_logprobs_sums_only_labelled_tokens():
    # vocab 3; row 0 labels tokens at t=1,2; row 1 only t=0
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, math.log(3), 0.0]],
                           [[2.0, 0.0, 0.0], [5.0, 5.0, 5.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, 2, 1], [0, -100, -100]])
    s, n = sequence_logprobs(logits, labels)
    by_hand0 = (3 - math.log(math.exp(1) + math.exp(2) + math.exp(3))) + math.log(3 / 5)
    by_hand1 = 2 - math.log(math.exp(2) + 2)
    assert s.tolist() == pytest.approx([by_hand0, by_hand1], abs=1e-6)
    assert n.tolist() == [2.0, 1.0]


def test_dpo_sigmoid_by_hand():
    beta = 0.1
    loss, rc, rr = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.5), beta=beta)
    h = (-10 + 11) - (-12 + 11.5)  # 1.5
    assert loss.item() == pytest.approx(-logsig(beta * h), abs=1e-12)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.05)
    # at equal policy and reference the loss is log 2
    assert dpo_loss(t(-3.0), t(-4.0), t(-3.0), t(-4.0))[0].item() == pytest.approx(math.log(2))


def test_conservative_dpo_label_smoothing_by_hand():
    beta, e = 0.5, 0.2
    loss, _, _ = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=beta, label_smoothing=e)
    h = 1.0 - (-1.0)
    assert loss.item() == pytest.approx(-(1 - e) * logsig(beta * h) - e * logsig(-beta * h), abs=1e-12)


def test_ipo_uses_per_token_margins():
    beta = 0.25
    loss, _, _ = dpo_loss(t(-8.0), t(-9.0), t(-10.0), t(-6.0), chosen_len=t(4), rejected_len=t(3), beta=beta,
                          loss_type="ipo")
    h = (-8 + 10) / 4 - (-9 + 6) / 3  # 0.5 + 1 = 1.5
    assert loss.item() == pytest.approx((h - 1 / (2 * beta)) ** 2, abs=1e-12)  # (1.5 - 2)^2 = 0.25
    assert loss.item() == pytest.approx(0.25)


def test_simpo_is_reference_free_and_length_normalised():
    beta, gamma = 2.0, 0.5
    loss, rc, rr = dpo_loss(t(-6.0), t(-10.0), None, None, chosen_len=t(3), rejected_len=t(4), beta=beta,
                            gamma=gamma, loss_type="simpo")
    z = beta * (-2.0 - (-2.5)) - gamma  # 0.5
    assert loss.item() == pytest.approx(-logsig(z), abs=1e-12)
    assert (rc.item(), rr.item()) == pytest.approx((-4.0, -5.0))


def test_orpo_by_hand():
    lam = 0.1
    c, r, lc, lr = -2.0, -6.0, 4.0, 3.0  # mean token log-probs -0.5 and -2
    loss, _, _ = dpo_loss(t(c), t(r), None, None, chosen_len=t(lc), rejected_len=t(lr), beta=lam, loss_type="orpo")
    pc, pr = math.exp(-0.5), math.exp(-2.0)
    log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
    assert loss.item() == pytest.approx(0.5 - lam * logsig(log_odds), abs=1e-9)


def test_reference_losses_demand_reference_and_lengths():
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(t(-1.0), t(-2.0), None, None)
    with pytest.raises(ValueError, match="chosen_len"):
        dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), loss_type="ipo")
    with pytest.raises(ValueError, match="unknown"):
        dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), loss_type="kto")  # type: ignore[arg-type]


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    c, r = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    dpo_loss(c, r, t(-5.0).float(), t(-5.0).float(), beta=0.1)[0].sum().backward()
    assert c.grad.item() == pytest.approx(-0.05) and r.grad.item() == pytest.approx(0.05)  # beta * sigma(0) = 0.05


def test_bradley_terry_by_hand():
    rc, rr = t(1.0, 0.0), t(0.0, 2.0)
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(-(logsig(1.0) + logsig(-2.0)) / 2)
    m = t(0.5, 0.0)
    assert bradley_terry_loss(rc, rr, margin=m).item() == pytest.approx(-(logsig(0.5) + logsig(-2.0)) / 2)
    # centering adds coef * mean((rc + rr)^2) = 0.01 * (1 + 4) / 2
    assert (bradley_terry_loss(rc, rr, center_coef=0.01) - bradley_terry_loss(rc, rr)).item() == pytest.approx(0.025)


def test_rating_loss_ignores_missing():
    pred = t(1.0, 2.0, 3.0).view(1, 3)
    target = torch.tensor([[2.0, float("nan"), 1.0]], dtype=torch.float64)
    assert rating_loss(pred, target).item() == pytest.approx((1 + 4) / 2)
    assert rating_loss(pred, torch.full((1, 3), float("nan"))).item() == 0.0


def test_log1mexp_is_accurate_near_zero_and_far_from_it():
    x = torch.tensor([-1e-6, -1e-4, -0.01, -0.5, -0.7, -3.0, -30.0])
    exact = [math.log(-math.expm1(v)) for v in x.double().tolist()]
    assert log1mexp(x).double().tolist() == pytest.approx(exact, rel=1e-6)
    # the naive form loses digits near 0 in float32: the reason for the switch
    naive = torch.log1p(-torch.exp(torch.tensor(-1e-4)))
    assert abs(naive.item() - exact[1]) > 1e-5 * abs(exact[1])

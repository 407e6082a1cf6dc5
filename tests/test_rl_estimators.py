"""RL estimators (tristage/train/rl.py) against hand-computed values and a transcription of the reference loops."""

from __future__ import annotations

import math

import pytest
import torch

from tristage.train.rl import (
    AdaptiveKL,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    token_rewards,
)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx([0.5, 0.0])
    assert kl_estimate(logp, ref, "k2").tolist() == pytest.approx([0.125, 0.0])
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([math.exp(-0.5) - 1 + 0.5, 0.0])
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")  # type: ignore[arg-type]


def test_kl_estimators_are_unbiased_where_claimed():
    """Sampling from p, the means of k1 and k3 approach KL(p || q); k3 is never negative."""
    g = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[x], q.log()[x]
    exact = float((p * (p / q).log()).sum())
    assert kl_estimate(logp, logq, "k1").mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_estimate(logp, logq, "k3").mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_estimate(logp, logq, "k3").min().item() >= 0


def test_masked_statistics_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    assert masked_var(x, mask).item() == pytest.approx(5 / 3)  # (2.25 + .25 + .25 + 2.25) / 3
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25)
    w = masked_whiten(x, mask)
    expect = [(v - 2.5) / math.sqrt(5 / 3 + 1e-8) for v in (1, 2, 3, 4)]
    assert w[mask].tolist() == pytest.approx(expect)
    assert w[~mask].tolist() == [0.0, 0.0]
    assert masked_whiten(x, mask, shift_mean=False)[mask].tolist() == pytest.approx([e + 2.5 for e in expect])


def test_token_rewards_by_hand():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 7.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    r = token_rewards(torch.tensor([1.0, 2.0]), kl, mask, beta=0.5)
    assert r.tolist() == [pytest.approx([-0.05, -0.1, 0.85]), pytest.approx([1.75, 0.0, 0.0])]


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=0.9)
    # t=2: 1 - .7 = .3; t=1: (0 + .7 - .6) + .9 * .3 = .37; t=0: (.6 - .5) + .9 * .37 = .433
    assert adv[0].tolist() == pytest.approx([0.433, 0.37, 0.3])
    assert ret[0].tolist() == pytest.approx([0.933, 0.97, 1.0])
    # a shorter row: nothing after its end counts (values there are ignored)
    adv, ret = gae(torch.tensor([[1.0, 2.0, 5.0]]), torch.tensor([[0.5, 1.0, 9.0]]),
                   torch.tensor([[True, True, False]]), gamma=0.5, lam=1.0)
    assert adv[0].tolist() == pytest.approx([1.5, 1.0, 0.0])  # t=1: 2 - 1; t=0: 1 + .5 * 1 - .5 + .5 * 1
    assert ret[0].tolist() == pytest.approx([2.0, 2.0, 0.0])


def _gae_reference(rewards, values, gamma, lam):
    """TRL's PPO loop (values and rewards already zero after each response's end)."""
    lastgaelam, out = 0, []
    T = rewards.shape[1]
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        out.append(lastgaelam)
    adv = torch.stack(out[::-1], 1)
    return adv, adv + values


def test_gae_equals_reference_loop_on_random_batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        N, T = 6, 9
        lengths = torch.randint(1, T + 1, (N,), generator=g)
        mask = torch.arange(T) < lengths[:, None]
        r = torch.randn(N, T, generator=g) * mask
        v = torch.randn(N, T, generator=g) * mask
        adv, ret = gae(r, v, mask, gamma=0.97, lam=0.9)
        a2, r2 = _gae_reference(r, v, 0.97, 0.9)
        assert torch.allclose(adv, a2 * mask, atol=1e-6) and torch.allclose(ret, r2 * mask, atol=1e-6)


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    assert group_advantages(r, "grpo")[0].tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001])
    assert group_advantages(r, "grpo")[1].tolist() == [0.0, 0.0, 0.0]
    assert group_advantages(r, "grpo-unscaled")[0].tolist() == pytest.approx([-1.0, 0.0, 1.0])
    assert group_advantages(r, "rloo")[0].tolist() == pytest.approx([1 - 2.5, 2 - 2.0, 3 - 1.5])
    with pytest.raises(ValueError):
        group_advantages(torch.ones(2, 1), "rloo")


def test_clipped_policy_loss_by_hand():
    # ratios e^.5 (A=+1: clipped at 1.2), e^-.5 (A=+1: unclipped), e^-.5 (A=-1: clipped at .8), padding
    logp = torch.tensor([[0.5, -0.5, -0.5, 3.0]], requires_grad=True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, st = clipped_policy_loss(logp, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(-1.2 - math.exp(-0.5) + 0.8)
    assert st["clipfrac"].item() == 2
    assert st["ratio"].item() == pytest.approx(math.exp(0.5) + 2 * math.exp(-0.5))
    assert st["ratio_max"].item() == pytest.approx(math.exp(0.5))
    loss.backward()  # the clipped tokens pass no gradient; the unclipped one's is -A * ratio
    assert logp.grad[0].tolist() == pytest.approx([0.0, -math.exp(-0.5), 0.0, 0.0])
    # per-token weights (the sequence aggregation) scale each term
    w = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    lw, _ = clipped_policy_loss(logp.detach(), old, adv, mask, clip=0.2, weights=w)
    assert lw.item() == pytest.approx(0.5 * (-1.2 - math.exp(-0.5)) + 0.8)


def test_ratio_one_gives_the_policy_gradient():
    """At ratio 1 the surrogate's gradient is -A (the REINFORCE gradient of log p)."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -3.0]])
    loss, st = clipped_policy_loss(logp, logp.detach(), adv, torch.ones(1, 2, dtype=torch.bool), 0.2)
    loss.backward()
    assert logp.grad.tolist() == [[-2.0, 3.0]] and st["clipfrac"].item() == 0


def test_clipped_value_loss_by_hand():
    v = torch.tensor([[1.0, 0.6]])
    old = torch.tensor([[0.5, 0.5]])
    ret = torch.tensor([[2.0, 0.0]])
    loss, st = clipped_value_loss(v, old, ret, torch.ones(1, 2, dtype=torch.bool), clip=0.2)
    # token 0: clipped 0.7 -> max(1, 1.69); token 1: inside the range -> .36
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.36))
    assert st["vf_clipfrac"].item() == 1


def test_explained_variance_and_entropy():
    mask = torch.ones(1, 4, dtype=torch.bool)
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.5), ret, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(ret, torch.ones_like(ret), mask))
    assert entropy_from_logits(torch.zeros(3, 4)).tolist() == pytest.approx([math.log(4)] * 3)
    assert entropy_from_logits(torch.tensor([[0.0, -1e9]])).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_by_hand():
    c = AdaptiveKL(0.1, target=1.0, horizon=100)
    c.update(kl=2.0, n=10)  # error clipped to +0.2: beta *= 1 + 0.2 * 10 / 100
    assert c.value == pytest.approx(0.102)
    c.update(kl=0.9, n=10)  # error -0.1
    assert c.value == pytest.approx(0.102 * (1 - 0.1 * 0.1))
    fixed = AdaptiveKL(0.1)
    fixed.update(kl=50.0, n=1000)
    assert fixed.value == 0.1

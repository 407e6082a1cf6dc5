"""The estimators of reinforcement learning from a reward: pure functions on padded [N, T] tensors with a mask.

N sequences (rollouts), T = the longest response; `mask` [N, T] (bool) marks each response's real tokens, which
come first in their row (right padding). Every function here is pinned by a test against hand-computed values.

    kl = kl_estimate(logp, ref_logp, "k1")                            # [N, T] per-token KL(policy || reference)
    r = token_rewards(scores, kl, mask, beta)                         # PPO: -beta * KL everywhere + score at the end
    adv, ret = gae(r, values, mask, gamma=1.0, lam=0.95)              # generalised advantage estimation
    adv = masked_whiten(adv, mask)                                    # zero mean, unit variance over real tokens
    loss, stats = clipped_policy_loss(logp, old_logp, adv, mask, 0.2) # PPO-clip, summed over real tokens
    vloss, vstats = clipped_value_loss(v, old_v, ret, mask, 0.2)
    adv = group_advantages(rewards.view(P, k), "grpo")                # critic-free baselines (GRPO, RLOO)

Choices, and why:
- Losses come back *summed* over the real tokens (or sequences) with their statistics, not averaged: the shared
  training loop divides by the global count (tokens or sequences over every micro-batch and process), so the
  gradient is the mean over the whole batch whatever the split. Which count divides is the aggregation:
  `token` (every real token of the batch weighs the same: PPO's and DAPO's form) or `sequence` (each sequence's
  token mean, then the mean over sequences: GRPO's original form, where a long answer's tokens weigh less).
- KL estimators (Schulman, "Approximating KL divergence"), with r = p_ref / p_policy at a sampled token:
  k1 = -log r (unbiased, can be negative per token), k2 = (log r)^2 / 2 (low variance, biased),
  k3 = (r - 1) - log r (unbiased and never negative). PPO puts k1 in the reward (InstructGPT's form); GRPO puts k3
  in the loss (DeepSeekMath's form); a stage uses one place, never both.
- Whitening uses the unbiased variance (Bessel's correction) and 1e-8 inside the square root, as TRL's
  `masked_whiten`; advantages are shifted to zero mean (`shift_mean=True`).
- The value loss is 0.5 * max((v - R)^2, (v_clipped - R)^2) with v_clipped within `clip` of the rollout's values
  (the PPO2 form used by TRL and OpenRLHF).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLKind = Literal["k1", "k2", "k3"]
Baseline = Literal["grpo", "grpo-unscaled", "rloo"]  # as tristage.flags.grpo.Baseline (torch-free there)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [N, T] over the True entries of mask [N, T] (a scalar; 0 when there are none)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over the True entries of mask (Bessel-corrected when unbiased and there are >= 2)."""
    m = mask.to(x.dtype)
    n = m.sum()
    var = (((x - masked_mean(x, mask)) ** 2) * m).sum() / n.clamp(min=1)
    return var * n / (n - 1) if unbiased and n >= 2 else var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, stats: tuple[Tensor, Tensor] | None = None
                  ) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the True entries of mask; the mean is added back when not shift_mean.
    Entries outside the mask are 0. stats = (mean, var) replaces the batch's own (e.g. taken over every process)."""
    mean, var = stats if stats is not None else (masked_mean(x, mask), masked_var(x, mask))
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: KLKind = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) at tokens sampled from the policy: logp, ref_logp [N, T] are
    the two models' log-probs of those tokens. k1 = logp - ref_logp; k2 = (logp - ref_logp)^2 / 2;
    k3 = exp(ref_logp - logp) - 1 - (ref_logp - logp)."""
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2 or k3)")


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """PPO's per-token reward [N, T]: -beta * kl at every real token, plus the sequence's score [N] at its last
    real token (0 outside the mask). A sequence with no real token gets nothing."""
    r = -beta * kl * mask.to(kl.dtype)
    lengths = mask.sum(-1)
    rows = torch.nonzero(lengths > 0).squeeze(-1)
    r[rows, lengths[rows] - 1] += scores[rows].to(r.dtype)
    return r


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's real tokens: -> (advantages [N, T], returns [N, T]).

    delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 after the last real token; A_t = delta_t + gamma * lam * A_{t+1};
    returns = A + V. rewards, values [N, T]; entries outside the mask are 0 in both outputs.
    """
    m = mask.to(values.dtype)
    v, r = values * m, rewards * m
    T = r.shape[1]
    adv = torch.zeros_like(r)
    last = torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        nxt = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * nxt - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + v) * m


def group_advantages(rewards: Tensor, baseline: Baseline = "grpo", eps: float = 1e-4) -> Tensor:
    """Critic-free advantages of k answers per prompt: rewards [P, k] -> [P, k].

    grpo: (r - group mean) / (group std + eps), the std unbiased (DeepSeekMath; TRL's GRPOTrainer);
    grpo-unscaled: r - group mean (no division: "Dr. GRPO", which removes the std's bias toward easy prompts);
    rloo: r - the mean of the other k - 1 answers (leave-one-out; Ahmadian et al. 2024), needs k >= 2.
    """
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"a group baseline needs at least 2 answers per prompt, got {k}")
    mean = rewards.mean(1, keepdim=True)
    if baseline == "grpo":
        return (rewards - mean) / (rewards.std(1, keepdim=True) + eps)
    if baseline == "grpo-unscaled":
        return rewards - mean
    if baseline == "rloo":
        return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    raise ValueError(f"unknown baseline {baseline!r} (grpo, grpo-unscaled or rloo)")


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float,
                        weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, summed over the real tokens: sum of max(-A * ratio, -A * clip(ratio, 1 +- clip)).

    logp [N, T] (with gradients), old_logp [N, T] (the rollout's), advantages [N, T] (a sequence's advantage
    repeated over its tokens for GRPO); weights [N, T] scales each token's term (1 / length for the sequence
    aggregation). Returns (loss, sums over real tokens of clipped (0/1), ratio and approx_kl (k3 of the ratio),
    weighted as the loss is, so they share its denominator, and the largest ratio as "ratio_max").
    """
    m = mask.to(logp.dtype)
    w = m if weights is None else m * weights
    log_ratio = (logp - old_logp) * m
    ratio = torch.exp(log_ratio)
    loss1, loss2 = -advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = (torch.maximum(loss1, loss2) * w).sum()
    with torch.no_grad():
        stats = {"clipfrac": ((loss2 > loss1).to(m.dtype) * w).sum(), "ratio": (ratio * w).sum(),
                 "approx_kl": ((torch.expm1(-log_ratio) + log_ratio) * w).sum(),
                 "ratio_max": (ratio * m).max() if m.any() else ratio.new_tensor(1.0)}
    return loss, stats


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float,
                       weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """0.5 * max((v - R)^2, (clip(v, old_v +- clip) - R)^2), summed over the real tokens: values [N, T] (with
    gradients), old_values and returns [N, T] from the rollout. Returns (loss, {"vf_clipfrac": sum of 0/1})."""
    m = mask.to(values.dtype)
    w = m if weights is None else m * weights
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * (torch.maximum(l1, l2) * w).sum()
    return loss, {"vf_clipfrac": ((l2 > l1).to(m.dtype) * m).sum().detach()}


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the real tokens: 1 is a perfect critic, 0 no better than the
    mean, negative worse; nan when the returns do not vary."""
    var = masked_var(returns, mask)
    if var.item() == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy (nats) of softmax(logits) over the last axis, in fp32: [..., V] -> [...]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


class AdaptiveKL:
    """The KL coefficient beta: fixed, or adaptive (Ziegler et al. 2019): after each rollout batch with mean KL per
    sequence `kl`, beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon, steering the KL toward `target`."""

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        err = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n / self.horizon

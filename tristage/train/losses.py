"""Preference losses: pure functions of log-probabilities and rewards, nothing else.

Every loss here takes tensors and returns tensors; it knows nothing about models, batches or
optimizers, so each is pinned by a test against hand-computed values (tests/test_losses.py) and
against TRL's implementation in bench/bench_preference.py.

Choices, and why:
- Sequence log-probabilities are *sums* over the response tokens (prompt and padding masked by
  label -100), as in the DPO paper. The length-normalised methods (IPO, SimPO, ORPO) divide by the
  response's token count, as their papers and TRL do.
- `dpo_loss` returns per-pair losses and the implicit rewards beta * (log pi - log pi_ref) of chosen
  and rejected. Under DPO the chosen reward often *falls* while the margin grows: the loss only sees the
  difference, and pushing the rejected answer down is the cheaper way to widen it, which drags down
  the shared prompt-like tokens of the chosen one too. That is expected; watch the margin and accuracy.
- One function for the family, chosen by `loss_type`, since the variants differ only in how they turn
  the log-ratio margin into a loss:
    sigmoid  DPO:  -log sigma(beta * h)                       h = (c - c_ref) - (r - r_ref)
             with label_smoothing e > 0 (conservative DPO): -(1-e) log sigma(beta h) - e log sigma(-beta h)
    ipo      IPO:  (h' - 1 / (2 beta))^2                      h' = the same margin on per-token means
    simpo    SimPO (no reference): -log sigma(beta * (c/|c| - r/|r|) - gamma)
    orpo     ORPO (no reference): NLL(chosen per token) - lambda * log sigma(log odds(c) - log odds(r)),
             odds(y) = p / (1 - p) with p = exp(mean token log-prob); lambda is `beta`.
- Reward models use the Bradley-Terry loss -log sigma(r_c - r_r - margin), with the optional
  reward-centering term coef * mean((r_c + r_r)^2) that keeps rewards near zero (Eisenstein et al.).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tristage.flags.base import LossType

REFERENCE_FREE = ("simpo", "orpo")


def dpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None, *,
             chosen_len: Tensor | None = None, rejected_len: Tensor | None = None, beta: float = 0.1,
             loss_type: LossType = "sigmoid", label_smoothing: float = 0.0, gamma: float = 0.5,
             chosen_nll: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair loss of the DPO family and the implicit rewards of chosen and rejected.

    chosen, rejected [B]: summed response log-probs under the policy; ref_chosen, ref_rejected [B]: the same
    under the reference (None for simpo / orpo); chosen_len, rejected_len [B]: response token counts (needed
    by ipo, simpo, orpo); chosen_nll [B]: the chosen response's mean token NLL (orpo's SFT term; default
    -chosen / chosen_len). gamma: SimPO's target margin.
    Returns (loss [B], chosen_reward [B], rejected_reward [B]), rewards detached: beta * (logp - ref logp) for
    the reference-based losses, beta * mean token logp for the reference-free ones.
    """
    if loss_type not in ("sigmoid", "ipo", *REFERENCE_FREE):
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from sigmoid, ipo, simpo, orpo")
    if loss_type in REFERENCE_FREE or loss_type == "ipo":
        if chosen_len is None or rejected_len is None:
            raise ValueError(f"loss_type {loss_type!r} needs chosen_len and rejected_len")
    if loss_type not in REFERENCE_FREE and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"loss_type {loss_type!r} needs the reference log-probs")
    if loss_type == "sigmoid":
        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
        return loss, (beta * (chosen - ref_chosen)).detach(), (beta * (rejected - ref_rejected)).detach()
    if loss_type == "ipo":
        h = (chosen - ref_chosen) / chosen_len - (rejected - ref_rejected) / rejected_len
        loss = (h - 1 / (2 * beta)) ** 2
        return loss, (beta * (chosen - ref_chosen)).detach(), (beta * (rejected - ref_rejected)).detach()
    avg_c, avg_r = chosen / chosen_len, rejected / rejected_len
    if loss_type == "simpo":
        z = beta * (avg_c - avg_r) - gamma
        loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        return loss, (beta * avg_c).detach(), (beta * avg_r).detach()
    # orpo: log odds(p) = log p - log(1 - p), with log p = mean token log-prob <= 0
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    nll = -avg_c if chosen_nll is None else chosen_nll
    return nll - beta * F.logsigmoid(log_odds), (beta * avg_c).detach(), (beta * avg_r).detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012): log1p(-exp(x)) far from 0,
    log(-expm1(x)) near it, where 1 - exp(x) would lose its digits. x is clamped below -1e-7."""
    x = x.clamp(max=-1e-7)
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None,
                       center_coef: float = 0.0) -> Tensor:
    """Mean reward-model loss over pairs: -log sigma(r_c - r_r - margin) + center_coef * mean((r_c + r_r)^2).

    r_chosen, r_rejected [B] scalar rewards; margin [B] optional (e.g. from rating gaps). Returns a scalar.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def rating_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of per-attribute heads over the ratings present (NaN = not rated).

    pred, target [N, A]. Returns a scalar (0 when nothing is rated).
    """
    have = ~torch.isnan(target)
    if not have.any():
        return pred.sum() * 0.0
    return ((pred - torch.nan_to_num(target)) ** 2)[have].mean()

"""Optimizer and learning-rate schedules shared by every training stage.

Choices, and why:
- AdamW with weight decay on matrices and embeddings only (dim >= 2); norms and biases are not decayed
  (decaying a norm's gain towards 0 fights the model for no benefit). The fused kernel is used where
  torch has one for the device (CUDA, and CPU since torch 2.4), else foreach.
- The schedule is a pure function of the step (`lr_at`), so a resumed run needs no scheduler state and
  cannot drift: warmup then cosine to `min_lr_ratio * lr`, warmup-stable-decay (linear cool-down over
  the last `decay_frac` of training, as in MiniCPM / nanochat), or constant after warmup.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from tristage.flags.base import Schedule


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, fused: bool | None = None,
                    lr_scale: Callable[[str], float] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, matrices decayed. lr_scale(parameter name) -> a factor on the learning
    rate (kept in each group as "lr_scale", which `set_lr` applies): e.g. PPO's value model at its own rate."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.dim() >= 2, lr_scale(name) if lr_scale else 1.0), []).append(p)
    params = [p for ps in groups.values() for p in ps]
    param_groups = [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
                    for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    if fused is None:
        # DTensor parameters (FSDP2) take the foreach path; plain tensors the fused kernel
        fused = not any(type(p).__name__ == "DTensor" for p in params)
    kw = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, **kw)
    set_lr(opt, lr)
    return opt


def lr_at(step: int, max_steps: int, lr: float, warmup_steps: int = 0, schedule: Schedule = "cosine",
          min_lr_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based) of `max_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    floor = lr * min_lr_ratio
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(decay_frac * max_steps))
        start = max_steps - decay_steps
        if step < start:
            return lr
        progress = min(1.0, (step - start) / decay_steps)
        return lr + (floor - lr) * progress
    raise ValueError(f"unknown schedule {schedule!r} (cosine, wsd, constant)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate: lr times the group's "lr_scale" (1 when it has none)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
